"""The provider's deployment of the defense: OpenAI-compatible chat completions, secret inside.

:func:`create_app` serves one model, :func:`create_multi_app` several (chosen by the request's
``model``; an unknown name is a 404 ``model_not_found``), each with its own secret, prepended
server-side (see :mod:`backdooralign.serving.model_state`). Routes: ``POST /v1/chat/completions``
(streamed as server-sent events with ``stream: true``), ``GET /v1/models``, ``GET /health``.

Requests are generated together: each model has a scheduler that batches waiting requests and
lets new ones join between decoding steps (:mod:`backdooralign.generation.scheduler`); the prefix
every prompt shares, secret included, is encoded once (:mod:`backdooralign.generation.engine`). When
the queue is full the answer is a 503 with ``Retry-After``; a request that takes longer than
``request_timeout`` seconds (waiting included) is cancelled and answered with a 504
(``code: "timeout"``; a stream that already started ends with that error as its last event);
a client that disconnects has its rows cancelled at the next step (others go on), and a
non-streamed request then gets a 499.

Limits: request bodies over ``max_body_bytes`` get a 413, prompts over ``max_prompt_tokens``
(counted without the secret) a 400; parameters are honoured or refused, never dropped, and
messages that spell control tokens are refused (see :mod:`backdooralign.serving.protocol`);
an address that sent too many wrong API keys gets 429s, and slow clients are closed (the
:class:`~backdooralign.serving.http.HTTPLimits` that :class:`ServeConfig` inherits).

The secret is a credential. It never leaves the server: answers that echo it, rewritten or
encoded, have it replaced by ``[redacted]``, also across streamed chunks (text that could
still turn out to be part of a fragment is held back); stop strings are matched after
redaction; logs record counts, never contents; ``/health`` shows only fingerprints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request

from ..config import PORT_MAX, option
from ..core.redact import redactor
from ..core.secret import Secret
from .chat_route import respond
from .http import (
    LOOPBACK,
    APIError,
    AuthThrottle,
    HTTPLimits,
    answer_errors_as_json,
    authorize,
    json_body,
    read_body,
    run,
)
from .model_state import (
    REDACTED,
    ModelState,
    ServedModel,
    default_max_prompt_tokens,
    load_served_models,
    model_state,
)

__all__ = ["ServeConfig", "ServedModel", "create_app", "create_multi_app", "serve"]
__all__ += ["default_max_prompt_tokens"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
NO_DOCS = {"docs_url": None, "redoc_url": None, "openapi_url": None}  # no pages beyond the API
APP_OPTIONS = (
    "max_body_bytes",
    "max_prompt_tokens",
    "max_batch_size",
    "max_queue",
    "request_timeout",
)


@dataclass(frozen=True)
class ServeConfig(HTTPLimits):
    """How :func:`serve` listens and what it allows (the flags of ``backdooralign serve``);
    the connection limits (timeouts, connections, wrong keys) are :class:`HTTPLimits`'."""

    system: str | None = option(None, "default system prompt (after the secret) when none is sent")
    host: str = option("127.0.0.1", "interface to listen on")
    port: int = option(8000, "TCP port (0: any free one)", minimum=0, maximum=PORT_MAX)
    max_new_tokens: int = option(1024, "cap on answer length", minimum=1)
    model_name: str | None = option(None, "name in /v1/models of a single model (default: its)")
    max_batch_size: int = option(16, "answers decoded together (1: one at a time)", minimum=1)
    max_queue: int = option(64, "requests waiting per model; more get 503", minimum=1)
    request_timeout: float | None = option(
        None,
        "seconds a request may take, waiting included; then 504 (default: no limit)",
        minimum=0,
    )
    max_body_bytes: int = option(DEFAULT_MAX_BODY_BYTES, "larger request bodies get 413", minimum=1)
    max_prompt_tokens: int | None = option(
        None,
        "longer prompts get 400 (default: the model's context minus answer and secret)",
        minimum=1,
    )

    def app_options(self) -> dict:
        """The keyword options of :func:`create_multi_app` this config sets."""
        return {n: getattr(self, n) for n in APP_OPTIONS}


def create_app(
    model,
    tokenizer,
    secret: Secret | None,
    default_system: str | None,
    model_name: str,
    max_new_tokens_cap: int = 1024,
    api_key: str | None = None,
    **options,
) -> FastAPI:
    """The chat-completions app for one model, with the secret injected server-side.

    Requests may name any model: there is only this one. ``options`` are those of
    :func:`create_multi_app`.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
        secret: the secret prepended to every system prompt, or ``None`` (no defense).
        default_system: system prompt for requests that send none (after the secret).
        model_name: the name ``/v1/models`` lists and responses carry.
        max_new_tokens_cap: upper bound on ``max_tokens``, and the answer length by default.
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
    """
    served = ServedModel(model_name, model, tokenizer, secret, default_system)
    return create_multi_app([served], max_new_tokens_cap, api_key, **options)


def create_multi_app(
    models: Sequence[ServedModel],
    max_new_tokens_cap: int = 1024,
    api_key: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_tokens: int | None = None,
    max_batch_size: int = 16,
    max_queue: int = 64,
    request_timeout: float | None = None,
    on_prompt: Callable[[str, list[dict]], None] | None = None,
    prefix_cache: bool = True,
    http: HTTPLimits | None = None,
) -> FastAPI:
    """The chat-completions app for several models, each with its own secret.

    Args:
        models: the models, by distinct names (with one model, any requested name is it).
        max_new_tokens_cap: upper bound on ``max_tokens`` / ``max_completion_tokens``, and the
            answer length when a request gives neither.
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>`` (401
            without); ``/health`` stays open.
        max_body_bytes: larger request bodies are refused with a 413 (default 1 MiB).
        max_prompt_tokens: longer prompts, counted without the secret, are refused with a 400
            (default: :func:`default_max_prompt_tokens`, per model).
        max_batch_size: most answers (rows) decoded together per model; 1 serves one
            request at a time.
        max_queue: most requests waiting per model; more get a 503 with ``Retry-After``.
        request_timeout: seconds a request may take, waiting included (``None``: no limit);
            then it is cancelled and answered with a 504.
        on_prompt: test hook, off by default: called with the model's name and the
            conversation it renders (secret included) for every request.
        prefix_cache: encode the prefix shared by a model's prompts (secret included) once;
            ``False`` encodes every prompt whole (for comparison in benchmarks).
        http: the connection limits (``None``: the defaults): the runner applies its
            timeouts and connection cap, and with ``api_key`` an address that sent
            ``auth_failures`` wrong keys within ``auth_window`` seconds gets 429s.

    Returns:
        A FastAPI app; run it with uvicorn (see :func:`serve`).
    """
    limits = {"max_new_tokens_cap": max_new_tokens_cap, "max_body_bytes": max_body_bytes}
    limits |= {"max_batch_size": max_batch_size, "max_queue": max_queue}
    if max_prompt_tokens is not None:
        limits["max_prompt_tokens"] = max_prompt_tokens
    _check_limits(limits)
    names = [m.name for m in models]
    if not names or len(set(names)) < len(names):
        raise ValueError(f"models need distinct names, got {names}")
    states = {}
    for m in models:
        states[m.name] = model_state(
            m,
            max_new_tokens_cap,
            max_prompt_tokens,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            on_prompt=on_prompt,
            prefix_cache=prefix_cache,
        )
        _check_limits({"max_prompt_tokens": states[m.name].max_prompt_tokens})
    redact_all = redactor(*(m.secret.text for m in models if m.secret), placeholder=REDACTED)
    app = FastAPI(title="backdooralign", redirect_slashes=False, **NO_DOCS)
    answer_errors_as_json(app, redact_all)
    app.router.on_shutdown.append(lambda: [s.scheduler.close() for s in states.values()])
    app.state.http_limits = http = http or HTTPLimits()
    throttle = AuthThrottle(http.auth_failures, http.auth_window)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request, api_key, throttle)
        body = json_body(await read_body(request, max_body_bytes))
        state = _route(states, body.get("model") if isinstance(body, dict) else None)
        return await respond(request, state, body, max_new_tokens_cap, request_timeout, redact_all)

    _info_routes(app, states, api_key, throttle)
    return app


def _route(states: dict[str, ModelState], name: object) -> ModelState:
    """The model a request names (with one model, any name is it); 404 for an unknown one."""
    if len(states) == 1:
        return next(iter(states.values()))
    if isinstance(name, str) and name in states:
        return states[name]
    raise APIError(
        f"the model {name!r} does not exist: this server serves {', '.join(states)}",
        "model",
        status=404,
        code="model_not_found",
    )


def _info_routes(
    app: FastAPI, states: dict[str, ModelState], api_key: str | None, throttle: AuthThrottle
) -> None:
    """``GET /v1/models`` and ``GET /health`` (fingerprints only, never secrets)."""

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        authorize(request, api_key, throttle)
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "backdooralign"} for n in states
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict:
        fps = {
            n: s.served.secret.fingerprint if s.served.secret else None for n, s in states.items()
        }
        body = {
            "status": "ok",
            "models": [{"id": n, "secret_fingerprint": fp} for n, fp in fps.items()],
        }
        if len(fps) == 1:
            [(name, fp)] = fps.items()
            body |= {"model": name, "secret_fingerprint": fp}
        return body


def _check_limits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def serve(
    model_path: str | None | Mapping[str, str | None],
    secret_path: str | Path | None | Mapping[str, str | Path | None],
    cfg: ServeConfig = ServeConfig(),
    *,
    api_key: str | None = None,
) -> None:
    """Load models and their secrets and serve them with uvicorn until interrupted.

    Args:
        model_path: Hugging Face id or local path (``None``: the embedded model), or a
            mapping name -> path to serve several models.
        secret_path: secret file (``None`` serves without the defense), or a mapping
            name -> secret file with the same names as ``model_path``.
        cfg: where to listen (anything but loopback without ``api_key`` is warned about), the
            default system prompt, the answer cap, a single model's name (default: the model
            directory's name, or its id) and the limits of :func:`create_multi_app`.
        api_key: bearer token required on ``/v1/*``; never logged.
    """
    from ..core.model import DEFAULT_MODEL

    model_name = cfg.model_name
    if not isinstance(model_path, Mapping):
        if model_name is None:
            is_dir = model_path is not None and Path(model_path).is_dir()
            model_name = Path(model_path).name if is_dir else (model_path or DEFAULT_MODEL)
        model_path, secret_path = {model_name: model_path}, {model_name: secret_path}
    assert isinstance(secret_path, Mapping)
    served = load_served_models(model_path, secret_path, cfg.system)
    options = cfg.app_options()
    app = create_multi_app(served, cfg.max_new_tokens, api_key, http=cfg.http_limits(), **options)
    if api_key is None and cfg.host not in LOOPBACK:
        log.warning(
            "serving on %s without an API key: anyone who can reach it can use it", cfg.host
        )
    auth = "on" if api_key else "off"
    url = f"http://{cfg.host}:{cfg.port}/v1"
    for m in served:
        fp = m.secret.fingerprint if m.secret else "none (no defense)"
        print(f"serving {m.name} on {url} (secret {fp}, auth {auth})", flush=True)
    run(app, cfg.host, cfg.port)
