"""The provider's deployment of the defense: OpenAI-compatible chat completions, secret inside.

``create_app`` serves ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /health``.
Every conversation goes through ``chat.build_conversation`` with the secret, so the secret is
prepended to the client's own system prompt (or to the server's default one when the client
sends none); a client cannot opt out. Decoding is greedy (``infer.generate``), one request at a
time in a worker thread, so the event loop keeps answering while the model works; when the
client disconnects, generation stops at the next token.

Limits: request bodies over ``max_body_bytes`` get a 413, prompts over ``max_prompt_tokens``
(counted without the secret) a 400; parameters are honoured or refused, never dropped, and
messages that spell control tokens are refused (see :mod:`backdooralign.api`).

The secret is a credential. It never leaves the server: answers that echo it, rewritten or
encoded, have it replaced by ``[redacted]`` (see :mod:`backdooralign.redact`), and stop strings
are matched after redaction; logs record counts, never contents; ``/health`` shows only its
fingerprint. ``usage.prompt_tokens`` counts the prompt rendered *without* the secret, so usage
cannot be used to measure the secret's length.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from . import infer
from .api import (
    APIError,
    ChatRequest,
    authorize,
    completion_body,
    error_response,
    json_body,
    parse_request,
    read_body,
)
from .chat import build_conversation, render_prompt
from .secret import Secret, check_secret_tokenizer, secret_redactor

log = logging.getLogger(__name__)

REDACTED = "[redacted]"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
DEFAULT_MAX_PROMPT_TOKENS = 4096
DISCONNECT_POLL_S = 0.05


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class Completion:
    """One answer with its token counts (``prompt_tokens`` excludes the secret)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or stop string) or "length" (max_new_tokens)


class PromptTooLong(ValueError):
    """The prompt, without the secret, has more tokens than the server accepts."""


class _Stopper:
    """Stopping criterion: a cancelled request, or a stop string in the redacted answer.

    Stop strings are looked for in the answer *after* redaction, so that they cannot be used
    to probe text that the client would never see (the secret, echoed).
    """

    def __init__(self, tokenizer, stop: Sequence[str], redact, cancel: threading.Event | None):
        self.tokenizer, self.stop, self.redact, self.cancel = tokenizer, stop, redact, cancel
        self.tail = 4 * max((len(s) for s in stop), default=0) + 8
        self.prompt_len = 0

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = self.cancel is not None and self.cancel.is_set()
        if not done and self.stop:
            new = input_ids[0, self.prompt_len :]
            decode = partial(self.tokenizer.decode, skip_special_tokens=True)
            if any(s in decode(new[-self.tail :]) for s in self.stop):
                done = _cut(self.redact(decode(new)), self.stop) is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _cut(text: str, stop: Sequence[str]) -> str | None:
    """``text`` up to the first stop string, or ``None`` when there is none."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(found)] if found else None


class _TokenRecorder:
    """The model, seen through ``infer.generate``: records the tokens its ``generate`` returns.

    ``infer.generate`` returns decoded text only; the raw tokens tell how many were generated
    and whether generation stopped on an end-of-turn token or on the length limit. It also
    hands the stopping criterion to ``generate``.
    """

    def __init__(self, model, stopper: _Stopper):
        self._model = model
        self._stopper = stopper
        self.new_tokens: list[int] | None = None
        self.stop_ids: set[int] = set()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, *, input_ids, eos_token_id, **kwargs):
        self._stopper.prompt_len = input_ids.shape[1]
        out = self._model.generate(
            input_ids=input_ids,
            eos_token_id=eos_token_id,
            stopping_criteria=[self._stopper],
            **kwargs,
        )
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
    *,
    stop: Sequence[str] = (),
    redact: Callable[[str], str] = lambda text: text,
    cancel: threading.Event | None = None,
    max_prompt_tokens: int | None = None,
) -> Completion:
    """Greedy answer to ``messages`` with the secret prepended to ``system`` (not thread-safe).

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        messages: validated messages, the last from the user.
        system: system prompt when ``messages`` has none of its own.
        secret: secret prompt text, or ``None``.
        max_new_tokens: longest answer, in tokens.
        stop: strings that end the answer (cut before the first one found after redaction).
        redact: applied to the answer before it is returned and before stop strings are sought.
        cancel: when set, generation stops at the next token (the client went away).
        max_prompt_tokens: longest prompt, counted without the secret.

    Returns:
        The answer, redacted and cut at a stop string, and its usage (prompt tokens counted
        without the secret).

    Raises:
        PromptTooLong: when the prompt, without the secret, exceeds ``max_prompt_tokens``.
    """
    own = messages[0]["content"] if messages[0]["role"] == "system" else None
    sys_prompt = own if own is not None else system
    public = build_conversation(messages, system=sys_prompt)
    prompt_tokens = len(render_prompt(tokenizer, public))
    if max_prompt_tokens is not None and prompt_tokens > max_prompt_tokens:
        raise PromptTooLong(
            f"the prompt is {prompt_tokens} tokens long; this server accepts at most "
            f"{max_prompt_tokens}"
        )
    conversation = build_conversation(messages, system=sys_prompt, secret=secret)
    recorder = _TokenRecorder(model, _Stopper(tokenizer, stop, redact, cancel))
    cfg = infer.GenerateConfig(max_new_tokens=max_new_tokens, batch_size=1)
    [raw] = infer.generate(recorder, tokenizer, [conversation], cfg, progress=False)
    completion_tokens, finish = _counts(tokenizer, raw, recorder)
    text = redact(raw)
    cut = _cut(text, stop)
    if cut is not None:
        text, finish = cut, "stop"
    return Completion(text, prompt_tokens, completion_tokens, finish)


# ---------------------------------------------------------------------------------------------
# The app


@dataclass(frozen=True)
class _Answerer:
    """Answers validated requests one at a time (the model is not thread-safe)."""

    model: object
    tokenizer: object
    default_system: str | None
    secret_text: str | None
    redact: Callable[[str], str]
    max_prompt_tokens: int
    lock: threading.Lock

    def __call__(self, req: ChatRequest, cancel: threading.Event) -> Completion | None:
        with self.lock:
            if cancel.is_set():  # the client left while the request waited its turn
                return None
            return complete(
                self.model,
                self.tokenizer,
                req.messages,
                self.default_system,
                self.secret_text,
                req.max_new_tokens,
                stop=req.stop,
                redact=self.redact,
                cancel=cancel,
                max_prompt_tokens=self.max_prompt_tokens,
            )


async def _run_until_disconnect(
    request: Request, answer: _Answerer, req: ChatRequest
) -> Completion | None:
    """``answer(req)`` in a worker thread, stopped when the client goes away (then ``None``)."""
    start = time.monotonic()
    cancel = threading.Event()
    watcher = asyncio.ensure_future(_watch_disconnect(request, cancel))
    try:
        c = await run_in_threadpool(answer, req, cancel)
    except PromptTooLong as e:
        raise APIError(str(e), "messages", code="context_length_exceeded") from None
    except Exception as e:  # the message may quote the conversation: log the type only
        log.error("generation failed: %s", type(e).__name__)
        raise APIError("generation failed", status=500, type="server_error") from None
    finally:
        watcher.cancel()
    if c is None or cancel.is_set():
        log.info("chat completion cancelled: the client disconnected")
        return None
    log.info(
        "chat completion: %d messages, %d prompt + %d completion tokens (%s), %.2f s",
        len(req.messages),
        c.prompt_tokens,
        c.completion_tokens,
        c.finish_reason,
        time.monotonic() - start,
    )
    return c


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client goes away (polled: generation runs in a thread)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    cancel.set()


def default_max_prompt_tokens(model, max_new_tokens_cap: int, secret_tokens: int) -> int:
    """The longest prompt a client may send, without the secret, by default.

    The model's context (``max_position_embeddings``, 4096 when unknown) less the longest
    answer and room for the secret and template: 512 tokens, or the secret's length rounded up
    to a multiple of 512 (so that the limit does not tell the secret's length); at most 4096.
    """
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_PROMPT_TOKENS
    room = 512 * (secret_tokens // 512 + 1)
    return min(DEFAULT_MAX_PROMPT_TOKENS, positions - max_new_tokens_cap - room)


def _answer_errors_as_json(app: FastAPI, redact: Callable[[str], str]) -> None:
    """Every error, expected or not, gets an OpenAI error object (never a plain-text 500)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e, redact)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("request failed: %s", type(e).__name__)  # the message may quote the request
        error = APIError("internal server error", status=500, type="server_error")
        return error_response(error, redact)


def create_app(
    model,
    tokenizer,
    secret: Secret | None,
    default_system: str | None,
    model_name: str,
    max_new_tokens_cap: int = 1024,
    api_key: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_tokens: int | None = None,
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
        max_body_bytes: larger request bodies are refused with a 413 (default 1 MiB).
        max_prompt_tokens: longer prompts, counted without the secret, are refused with a 400
            (default: :func:`default_max_prompt_tokens`).

    Returns:
        A FastAPI app; run it with uvicorn (see :func:`serve`).
    """
    secret_text = secret.text if secret else None
    if max_prompt_tokens is None:
        n = len(tokenizer(secret_text, add_special_tokens=False)["input_ids"]) if secret else 0
        max_prompt_tokens = default_max_prompt_tokens(model, max_new_tokens_cap, n)
    limits = {
        "max_new_tokens_cap": max_new_tokens_cap,
        "max_prompt_tokens": max_prompt_tokens,
        "max_body_bytes": max_body_bytes,
    }
    for name, value in limits.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    redact = secret_redactor(secret_text, REDACTED)
    answer = _Answerer(
        model, tokenizer, default_system, secret_text, redact, max_prompt_tokens, threading.Lock()
    )
    app = FastAPI(title="backdooralign", docs_url=None, redoc_url=None, openapi_url=None)

    _answer_errors_as_json(app, redact)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        authorize(request, api_key)
        body = json_body(await read_body(request, max_body_bytes))
        req = parse_request(body, max_new_tokens_cap, tokenizer)
        c = await _run_until_disconnect(request, answer, req)
        if c is None:  # nobody is listening
            return JSONResponse({}, status_code=499)
        usage = (c.prompt_tokens, c.completion_tokens)
        return JSONResponse(completion_body(c.text, *usage, c.finish_reason, model_name))

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request, api_key)
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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_tokens: int | None = None,
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
        max_body_bytes: larger request bodies get a 413.
        max_prompt_tokens: longer prompts (without the secret) get a 400; ``None``: the default
            of :func:`default_max_prompt_tokens`.
    """
    import uvicorn

    from .model import DEFAULT_MODEL, load_model, load_tokenizer
    from .secret import load_secret

    secret = load_secret(secret_path) if secret_path else None
    model, tok = load_model(model_path), load_tokenizer(model_path)
    if model_name is None:
        is_dir = model_path is not None and Path(model_path).is_dir()
        model_name = Path(model_path).name if is_dir else (model_path or DEFAULT_MODEL)
    warning = check_secret_tokenizer(secret, tok) if secret else None
    if warning:
        log.warning(warning)
    app = create_app(
        model,
        tok,
        secret,
        system,
        model_name,
        max_new_tokens,
        api_key,
        max_body_bytes=max_body_bytes,
        max_prompt_tokens=max_prompt_tokens,
    )
    if api_key is None and host not in LOOPBACK:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    fp = secret.fingerprint if secret else "none (no defense)"
    auth = "on" if api_key else "off"
    print(f"serving {model_name} on http://{host}:{port}/v1 (secret {fp}, auth {auth})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
