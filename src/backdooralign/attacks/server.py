"""A model behind the real server, for one batch of requests: what an attacker talks to.

:func:`ask_server` starts :func:`backdooralign.serving.app.create_app` under uvicorn on a loopback
port in a background thread, sends each prompt with the ``openai`` client, as a customer
would, and stops the server. The secret stays server-side; the answers are what the server
sends (redacted).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..core.secret import Secret

START_TIMEOUT_S = 30
MODEL_NAME = "defended"


@contextmanager
def serving(app) -> Iterator[str]:
    """Run an ASGI app on 127.0.0.1 (a free port) in a thread; yields its ``/v1`` base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the local server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


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
    with serving(app) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="local", max_retries=0, timeout=600)
        for prompt in prompts:
            reply = client.chat.completions.create(
                model=MODEL_NAME,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
            )
            out.append(reply.choices[0].message.content or "")
    return out
