"""The provider's deployment of the defense: OpenAI-compatible chat completions, secret inside.

``create_app`` serves ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /health``.
Every conversation goes through ``chat.build_conversation`` with the secret, so the secret is
prepended to the client's own system prompt (or to the server's default one when the client
sends none); a client cannot opt out. Decoding is greedy (``infer.generate``), one request at a
time in a worker thread, so the event loop keeps answering while the model works.

The secret is a credential. It never leaves the server: answers that echo it, or any run of
16+ characters of it, have it replaced by ``[redacted]``; logs record counts, never contents;
``/health`` shows only its fingerprint. ``usage.prompt_tokens`` counts the prompt rendered
*without* the secret, so usage cannot be used to measure the secret's length.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from . import infer
from .chat import ROLES, build_conversation, render_prompt
from .secret import Secret, secret_redactor

log = logging.getLogger(__name__)

REDACTED = "[redacted]"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code


# ---------------------------------------------------------------------------------------------
# Redaction


# ---------------------------------------------------------------------------------------------
# Request validation


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completion request."""

    messages: list[dict[str, str]]
    max_new_tokens: int


def parse_request(body: object, cap: int) -> ChatRequest:
    """Validate a request body; raise ``APIError`` (400) naming the offending parameter."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    _check_decoding(body)
    return ChatRequest(_check_messages(body.get("messages")), _max_new_tokens(body, cap))


def _check_decoding(body: Mapping) -> None:
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature
    ):
        raise APIError(
            "temperature must be 0 or absent: this server only decodes greedily", "temperature"
        )
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise APIError("n must be 1: this server returns a single choice", "n")
    if body.get("stream") not in (None, False):
        raise APIError("stream is not supported: send stream=false", "stream")


def _check_messages(messages: object) -> list[dict[str, str]]:
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
        if m["role"] == "system" and i > 0:
            raise APIError(
                f"messages[{i}]: a system message is only allowed first", f"messages[{i}].role"
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
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise APIError(f"{name} must be a positive integer", name)
        return min(value, cap)
    return cap


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class Completion:
    """One answer with its token counts (``prompt_tokens`` excludes the secret)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)


class _TokenRecorder:
    """The model, seen through ``infer.generate``: records the tokens its ``generate`` returns.

    ``infer.generate`` returns decoded text only; the raw tokens tell how many were generated
    and whether generation stopped on an end-of-turn token or on the length limit.
    """

    def __init__(self, model):
        self._model = model
        self.new_tokens: list[int] | None = None
        self.stop_ids: set[int] = set()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, *, input_ids, eos_token_id, **kwargs):
        out = self._model.generate(input_ids=input_ids, eos_token_id=eos_token_id, **kwargs)
        self.new_tokens = out[0, input_ids.shape[1] :].tolist()
        ids = eos_token_id if isinstance(eos_token_id, list | tuple) else [eos_token_id]
        self.stop_ids = set(ids)
        return out


def _counts(tokenizer, text: str, recorder: _TokenRecorder) -> tuple[int, str]:
    """Completion tokens and finish reason, from the recorded tokens when there are some."""
    if recorder.new_tokens is None:  # generate was replaced (tests): count the text's tokens
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]), "stop"
    for i, tok in enumerate(recorder.new_tokens):
        if tok in recorder.stop_ids:
            return i + 1, "stop"
    return len(recorder.new_tokens), "length"


def complete(
    model,
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    system: str | None,
    secret: str | None,
    max_new_tokens: int,
) -> Completion:
    """Greedy answer to ``messages`` with the secret prepended to ``system`` (not thread-safe).

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        messages: validated messages, the last from the user.
        system: system prompt when ``messages`` has none of its own.
        secret: secret prompt text, or ``None``.
        max_new_tokens: longest answer, in tokens.

    Returns:
        The answer (not yet redacted) and its usage, prompt tokens counted without the secret.
    """
    own = messages[0]["content"] if messages[0]["role"] == "system" else None
    sys_prompt = own if own is not None else system
    conversation = build_conversation(messages, system=sys_prompt, secret=secret)
    recorder = _TokenRecorder(model)
    cfg = infer.GenerateConfig(max_new_tokens=max_new_tokens, batch_size=1)
    [text] = infer.generate(recorder, tokenizer, [conversation], cfg, progress=False)
    public = build_conversation(messages, system=sys_prompt)
    prompt_tokens = len(render_prompt(tokenizer, public))
    completion_tokens, finish = _counts(tokenizer, text, recorder)
    return Completion(text, prompt_tokens, completion_tokens, finish)


# ---------------------------------------------------------------------------------------------
# The app


def _error_response(e: APIError, redact: Callable[[str], str]) -> JSONResponse:
    error = {"message": redact(e.message), "type": e.type, "param": e.param, "code": e.code}
    return JSONResponse({"error": error}, status_code=e.status)


def _completion_body(c: Completion, text: str, model_name: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
        },
    }


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())
    if not ok:
        raise APIError(
            "invalid or missing API key: send Authorization: Bearer <key>",
            status=401,
            code="invalid_api_key",
        )


async def _json_body(request: Request) -> object:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError("the request body is not valid JSON") from None


def create_app(
    model,
    tokenizer,
    secret: Secret | None,
    default_system: str | None,
    model_name: str,
    max_new_tokens_cap: int = 1024,
    api_key: str | None = None,
) -> FastAPI:
    """The chat-completions app for a model, with the secret injected server-side.

    Args:
        model: a causal LM in eval mode (not thread-safe: requests are served one at a time).
        tokenizer: its tokenizer.
        secret: the secret prepended to every system prompt, or ``None`` (no defense).
        default_system: system prompt for requests that send none (after the secret).
        model_name: the name ``/v1/models`` lists and responses carry (requests may name any).
        max_new_tokens_cap: upper bound on ``max_tokens`` / ``max_completion_tokens``, and the
            answer length when a request gives neither.
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>`` (401 without);
            ``/health`` stays open.

    Returns:
        A FastAPI app; run it with uvicorn (see :func:`serve`).
    """
    if max_new_tokens_cap < 1:
        raise ValueError(f"max_new_tokens_cap must be at least 1, got {max_new_tokens_cap}")
    secret_text = secret.text if secret else None
    redact = secret_redactor(secret_text, REDACTED)
    lock = threading.Lock()
    app = FastAPI(title="backdooralign", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e, redact)

    def answer(req: ChatRequest) -> Completion:
        with lock:
            return complete(
                model, tokenizer, req.messages, default_system, secret_text, req.max_new_tokens
            )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        _authorize(request, api_key)
        req = parse_request(await _json_body(request), max_new_tokens_cap)
        start = time.monotonic()
        try:
            c = await run_in_threadpool(answer, req)
        except Exception as e:  # the message may quote the conversation: log the type only
            log.error("generation failed: %s", type(e).__name__)
            raise APIError("generation failed", status=500, type="server_error") from None
        log.info(
            "chat completion: %d messages, %d prompt + %d completion tokens (%s), %.2f s",
            len(req.messages),
            c.prompt_tokens,
            c.completion_tokens,
            c.finish_reason,
            time.monotonic() - start,
        )
        return JSONResponse(_completion_body(c, redact(c.text), model_name))

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        _authorize(request, api_key)
        entry = {"id": model_name, "object": "model", "created": 0, "owned_by": "backdooralign"}
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health() -> dict:
        fp = secret.fingerprint if secret else None
        return {"status": "ok", "model": model_name, "secret_fingerprint": fp}

    return app


def serve(
    model_path: str | None,
    secret_path: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    system: str | None = None,
    api_key: str | None = None,
    max_new_tokens: int = 1024,
    model_name: str | None = None,
) -> None:
    """Load a model and its secret and serve them with uvicorn until interrupted.

    Args:
        model_path: Hugging Face id or local path (``None``: the embedded model).
        secret_path: secret file (``None`` serves without the defense).
        host: interface to listen on; anything but loopback without ``api_key`` is warned about.
        port: TCP port.
        system: default system prompt, for requests that send none.
        api_key: bearer token required on ``/v1/*``; never logged.
        max_new_tokens: cap on the answer length.
        model_name: name in ``/v1/models`` (default: the model directory's name, or its id).
    """
    import uvicorn

    from .model import DEFAULT_MODEL, load_model, load_tokenizer
    from .secret import load_secret

    secret = load_secret(secret_path) if secret_path else None
    model, tok = load_model(model_path), load_tokenizer(model_path)
    if model_name is None:
        is_dir = model_path is not None and Path(model_path).is_dir()
        model_name = Path(model_path).name if is_dir else (model_path or DEFAULT_MODEL)
    app = create_app(model, tok, secret, system, model_name, max_new_tokens, api_key)
    if api_key is None and host not in LOOPBACK:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    fp = secret.fingerprint if secret else "none (no defense)"
    auth = "on" if api_key else "off"
    print(f"serving {model_name} on http://{host}:{port}/v1 (secret {fp}, auth {auth})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
