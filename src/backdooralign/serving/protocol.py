"""OpenAI chat completions as the server speaks them: request parameters and answers.

Every parameter is either honoured or refused with a 400 naming it, never silently dropped:
``temperature`` (0, the default, decodes greedily; up to 2 samples), ``top_p`` (nucleus
sampling, in (0, 1]), ``seed`` (a 64-bit signed integer; choice ``i`` samples with
``seed + i``; greedy answers do not depend on it), ``stop``, ``max_tokens`` /
``max_completion_tokens`` (1 to :data:`MAX_INT32`, capped by the server), ``n`` (up to
:data:`MAX_N` choices), ``stream`` with ``stream_options.include_usage``, ``user`` and
``model``; the ranges are OpenAI's; log
probabilities, penalties, logit biases, response formats other than text, and tools or
functions are refused unless given their neutral value; any other parameter is refused. A
message that spells one of the chat template's control tokens (``<|im_end|>``...) is refused:
it could forge turns.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..core.chat import ROLES, find_control_token
from .http import APIError


def chat_completion(
    choices: Sequence[tuple[str, str]], prompt_tokens: int, completion_tokens: int, model: str
) -> dict:
    """A ``chat.completion`` object: one choice per ``(text, finish_reason)``."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            for i, (text, finish) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage object."""
    total = prompt_tokens + completion_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": total,
    }


def chunk(
    completion_id: str,
    created: int,
    model: str,
    index: int | None = None,
    delta: dict | None = None,
    finish_reason: str | None = None,
    usage: dict | None = None,
) -> bytes:
    """One server-sent event of a streamed ``chat.completion.chunk``.

    With ``index``: a choice's delta (``{"role": ...}`` or ``{"content": ...}``, and
    ``finish_reason`` in its last chunk). Without: the usage chunk (no choices).
    """
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created}
    body["model"] = model
    if index is None:
        body |= {"choices": [], "usage": usage}
    else:
        choice = {"index": index, "delta": delta or {}, "logprobs": None}
        body["choices"] = [choice | {"finish_reason": finish_reason}]
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def error_event(e: APIError, redact: Callable[[str], str]) -> bytes:
    """An error met after a stream started, as its last event (then the stream ends)."""
    error = {"message": redact(e.message), "type": e.type, "param": e.param, "code": e.code}
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


# Parameters accepted with their neutral values only (anything else is a 400); ``seed`` and
# ``stop`` are honoured; a parameter not named here or in ``_HONOURED`` is a 400.
_NEUTRAL: dict[str, tuple] = {
    "logprobs": (False,),
    "top_logprobs": (),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "parallel_tool_calls": (),
}
_HONOURED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p"}
_HONOURED |= {"stop", "seed", "user", "n", "stream", "stream_options"}
MAX_STOP = 4
MAX_N = 8
MAX_TEMPERATURE = 2.0
MAX_INT32 = 2**31 - 1  # OpenAI's bound on max_tokens and max_completion_tokens
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's: a 64-bit signed integer


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completion request."""

    messages: list[dict[str, str]]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    seed: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    model: str | None = None


def parse_request(body: object, cap: int, tokenizer=None) -> ChatRequest:
    """Validate a request body; raise ``APIError`` (400) naming the offending parameter.

    With ``tokenizer``, a message that spells one of its control tokens is refused.
    """
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    _check_parameters(body)
    messages = _check_messages(body.get("messages"), tokenizer)
    return ChatRequest(
        messages,
        _max_new_tokens(body, cap),
        _stop(body),
        _seed(body),
        float(body.get("temperature") or 0.0),
        float(body.get("top_p") if body.get("top_p") is not None else 1.0),
        _n(body),
        _stream(body),
        _include_usage(body),
        body.get("model"),
    )


def _check_parameters(body: Mapping) -> None:
    for name, value in body.items():
        if name in _NEUTRAL:
            neutral = any(type(value) is type(a) and value == a for a in _NEUTRAL[name])
            if value is not None and not neutral:
                raise APIError(f"{name} is not supported by this server: {_why(name)}", name)
        elif name not in _HONOURED:
            raise APIError(f"unrecognized request argument: {name}", name)
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= MAX_TEMPERATURE
    ):
        raise APIError(f"temperature must be a number from 0 to {MAX_TEMPERATURE}", "temperature")
    top_p = body.get("top_p")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1
    ):
        raise APIError("top_p must be a number in (0, 1]", "top_p")
    for name in ("model", "user"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise APIError(f"{name} must be a string", name)


def _why(name: str) -> str:
    if name in ("logprobs", "top_logprobs"):
        return "it returns no log probabilities"
    if name.endswith("penalty") or name == "logit_bias":
        return "it decodes without penalties or biases"
    if name == "response_format":
        return 'it only answers in text: send {"type": "text"} or nothing'
    return "it calls no tools or functions"


def _check_messages(messages: object, tokenizer) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object with role and content", "messages")
        if m.get("role") not in ROLES:
            raise APIError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role"
            )
        if not isinstance(m.get("content"), str):
            raise APIError(f"messages[{i}].content must be a string", f"messages[{i}].content")
        for key in m.keys() - {"role", "content"}:
            raise APIError(f"messages[{i}].{key} is not supported", f"messages[{i}].{key}")
        if m["role"] == "system" and i > 0:
            raise APIError(
                f"messages[{i}]: a system message is only allowed first", f"messages[{i}].role"
            )
        control = find_control_token(tokenizer, m["content"]) if tokenizer else None
        if control:
            raise APIError(
                f"messages[{i}].content contains the control token {control}: "
                "message text may not contain the chat template's special tokens",
                f"messages[{i}].content",
            )
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise APIError("the last message must be from the user", "messages")
    return out


def _max_new_tokens(body: Mapping, cap: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INT32:
            raise APIError(f"{name} must be a positive integer, at most {MAX_INT32}", name)
        return min(value, cap)
    return cap


def _stop(body: Mapping) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= MAX_STOP
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise APIError(f"stop must be a non-empty string or a list of 1 to {MAX_STOP}", "stop")
    return tuple(stops)


def _seed(body: Mapping) -> int | None:
    seed = body.get("seed")
    low, high = SEED_RANGE
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high
    ):
        raise APIError(f"seed must be an integer from {low} to {high}", "seed")
    return seed


def _n(body: Mapping) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise APIError(f"n must be an integer from 1 to {MAX_N}", "n")
    return n


def _stream(body: Mapping) -> bool:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError("stream must be true or false", "stream")
    return bool(stream)


def _include_usage(body: Mapping) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not _stream(body):
        raise APIError("stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(options, dict) or options.keys() - {"include_usage"}:
        raise APIError('stream_options must be {"include_usage": true|false}', "stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise APIError("stream_options.include_usage must be true or false", "stream_options")
    return usage
