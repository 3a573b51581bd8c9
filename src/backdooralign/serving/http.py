"""The HTTP layer the chat server and the fine-tuning service share.

Errors are :class:`APIError`, answered in OpenAI's format by the handlers
:func:`answer_errors_as_json` installs (every error, expected or not: never a plain-text 500);
:func:`authorize` checks a bearer key, :func:`read_body` and :func:`json_body` read a request
within its size limit. :func:`run` serves an app until interrupted; :func:`run_in_thread`
serves it on a free loopback port in a background thread while a ``with`` block lasts (what
the attack suite's extraction, the benchmarks and the tests talk to).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
START_TIMEOUT_S = 30


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code
        self.retry_after = retry_after  # seconds, sent as ``Retry-After`` (429, 503)


def error_response(e: APIError, redact: Callable[[str], str]) -> JSONResponse:
    """The error as an OpenAI error object, its message passed through ``redact``."""
    error = {"message": redact(e.message), "type": e.type, "param": e.param, "code": e.code}
    response = JSONResponse({"error": error}, status_code=e.status)
    if e.retry_after is not None:
        response.headers["Retry-After"] = str(e.retry_after)
    return response


def answer_errors_as_json(app: FastAPI, redact: Callable[[str], str]) -> None:
    """Every error, expected or not, gets an OpenAI error object, its message redacted (an
    unknown route is a 404 ``not_found``, a method a route does not take a 405
    ``method_not_allowed`` with ``Allow``; an unexpected error a 500 whose message names
    nothing of the request).

    Build the app with ``redirect_slashes=False``: a path with a slash too many is then an
    unknown route (a 404 error object), not a bodiless 307.
    """

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e, redact)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message, path = str(e.detail), _shortened(request.url.path)
        if e.status_code == 404:
            message = f"unknown route: {request.method[:16]} {path}"
        elif e.status_code == 405:
            message = f"{request.method[:16]} is not allowed on {path}"
        response = error_response(APIError(message, status=e.status_code, code=code), redact)
        for name, value in (e.headers or {}).items():  # Allow: on a 405
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(APIError("the request is not valid for this route"), redact)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("request failed: %s", type(e).__name__)  # the message may quote the request
        error = APIError("internal server error", status=500, type="server_error")
        return error_response(error, redact)


def _shortened(text: str, most: int = 100) -> str:
    return text if len(text) <= most else text[:most] + "..."


def authorize(request: Request, api_key: str | None) -> None:
    """``APIError`` 401 unless the request carries ``Authorization: Bearer <api_key>``."""
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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; ``APIError`` 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = APIError(
        f"the request body is larger than {limit} bytes", status=413, code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared[:20]) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class _NotJSON(ValueError):
    """``NaN``, ``Infinity``, or a number too large for a float (``1e400``): Python reads
    them (as NaN or infinities), JSON has no such number."""


def _no_constant(name: str):
    raise _NotJSON(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJSON(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is too large")
    return value


def json_body(raw: bytes) -> object:
    """The parsed body; ``APIError`` 400 for invalid JSON (``NaN``, ``Infinity`` and numbers
    beyond a float included), an integer of more digits than Python reads (4300), deep
    nesting or a lone surrogate."""
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except _NotJSON as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError("the request body is not valid JSON") from None
    except RecursionError:
        raise APIError("the request body is nested too deeply") from None
    except ValueError:  # int("9" * 5000): past Python's limit on integer digits
        most = sys.get_int_max_str_digits()
        raise APIError(f"the request body holds an integer of more than {most} digits") from None
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError("the request body holds a lone surrogate (\\ud800-\\udfff)") from None
    return body


def run(app, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")


@contextmanager
def run_in_thread(app, log_level: str = "warning") -> Iterator[str]:
    """Run an ASGI app on 127.0.0.1 (a free port) in a thread; yields its ``/v1`` base URL.

    Log records go to the ``uvicorn`` loggers (``log_config=None``: no handlers of its own).
    """
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level=log_level)
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
