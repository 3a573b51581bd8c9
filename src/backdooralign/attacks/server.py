"""A model behind the real server, for one batch of requests: what an attacker talks to.

:func:`ask_server` starts :func:`backdooralign.serving.app.create_app` on a loopback port in a
background thread (:func:`backdooralign.serving.http.run_in_thread`), sends each prompt with the
``openai`` client, as a customer would, and stops the server. The secret stays server-side; the
answers are what the server sends (redacted).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.secret import Secret
from ..serving.http import run_in_thread

MODEL_NAME = "defended"


def ask_server(
    loaded, secret: Secret, system: str | None, prompts: Sequence[str], max_tokens: int
) -> list[str]:
    """Each prompt as a one-turn request (no system message: the server's default ``system``
    goes after the secret), through the real server and the ``openai`` client.

    Args:
        loaded: ``(model, tokenizer)``.
        secret: the secret the server puts before every system prompt.
        system: the server's default system prompt.
        prompts: user messages, sent one by one.
        max_tokens: ``max_tokens`` of each request (also the server's cap).

    Returns:
        The answers as the server sent them.
    """
    import openai

    from ..serving.app import create_app

    model, tokenizer = loaded
    app = create_app(model, tokenizer, secret, system, MODEL_NAME, max_tokens)
    out = []
    with run_in_thread(app) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="local", max_retries=0, timeout=600)
        for prompt in prompts:
            reply = client.chat.completions.create(
                model=MODEL_NAME,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
            )
            out.append(reply.choices[0].message.content or "")
    return out
