"""The HTTP layer the chat server and the fine-tuning service share.

Errors are :class:`APIError`, answered in OpenAI's format by the handlers
:func:`answer_errors_as_json` installs (every error, expected or not: never a plain-text 500);
:func:`authorize` checks a bearer key (wrong keys counted per client address by
:class:`AuthThrottle`: too many, and that address gets 429s for a while), :func:`read_body` and
:func:`json_body` read a request within its size limit. :func:`run` serves an app until
interrupted; :func:`run_in_thread` serves it on a free loopback port in a background thread
while a ``with`` block lasts (what the attack suite's extraction, the benchmarks and the tests
talk to). Both run uvicorn with the same :class:`HTTPLimits`, the ones the app was built with
(``app.state.http_limits``): a request head must arrive within ``header_timeout`` seconds, its
body within ``body_timeout`` (else a 408 and the connection is closed), idle keep-alive
connections close after ``keep_alive``, and ``max_connections`` caps open connections.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..config import option

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
START_TIMEOUT_S = 30
TRACKED_ADDRESSES = 10_000  # client addresses whose failed API keys are remembered, at most


@dataclass(frozen=True)
class HTTPLimits:
    """How long a client may take and how many it may be: the connection limits of ``serve``
    and ``service`` (their configs inherit these fields)."""

    header_timeout: float = option(
        10.0,
        "seconds a request's head (request line and headers) may take to arrive; then the "
        "connection is closed",
        minimum=0.01,
        maximum=3600,
    )
    body_timeout: float = option(
        30.0,
        "seconds a request's body may take to arrive, from the end of its head; then 408 and "
        "the connection is closed",
        minimum=0.01,
        maximum=86400,
    )
    keep_alive: float = option(
        5.0, "seconds an idle keep-alive connection stays open", minimum=0.01, maximum=3600
    )
    max_connections: int = option(
        1000,
        "open connections (or requests in progress) at most; then new requests get 503",
        minimum=1,
        maximum=1_000_000,
    )
    auth_failures: int = option(
        10,
        "wrong API keys a client address may send in auth_window seconds; then 429",
        minimum=1,
        maximum=1_000_000,
    )
    auth_window: float = option(
        60.0, "seconds over which wrong API keys are counted", minimum=1, maximum=86400
    )

    def http_limits(self) -> HTTPLimits:
        """These limits alone (of a config that inherits them)."""
        return HTTPLimits(**{f.name: getattr(self, f.name) for f in fields(HTTPLimits)})


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


def client_address(request: Request) -> str:
    """The address the request came from (``""`` when the server does not know it)."""
    return request.client.host if request.client else ""


class AuthThrottle:
    """Wrong API keys counted per client address, in a sliding window: an address that sent
    ``limit`` of them in the last ``window`` seconds gets a 429 (with ``Retry-After``) for any
    request that needs a key, right keys included, until the oldest of them is ``window``
    seconds old. Requests while blocked are not counted (they tell the client nothing);
    right keys do not reset the count. At most ``max_addresses`` addresses are remembered
    (the longest quiet is forgotten first); a success remembers nothing.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        max_addresses: int = TRACKED_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ):
        if limit < 1 or window <= 0 or max_addresses < 1:
            raise ValueError("limit and max_addresses must be at least 1, window positive")
        self.limit, self.window, self.max_addresses = limit, window, max_addresses
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, address: str) -> None:
        """``APIError`` 429 while ``address`` is blocked."""
        now = self.clock()
        with self._lock:
            seen = self._failures.get(address)
            if seen is None or len(seen) < self.limit or seen[0] <= now - self.window:
                return
            wait = max(1, math.ceil(seen[0] + self.window - now))
        raise APIError(
            f"too many requests with a wrong API key from this address; retry after {wait} s",
            status=429,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            retry_after=wait,
        )

    def failed(self, address: str) -> None:
        """Count a wrong or missing key sent from ``address``."""
        now = self.clock()
        with self._lock:
            seen = self._failures.pop(address, None)
            if seen is None:
                seen = deque(maxlen=self.limit)
            seen.append(now)
            self._failures[address] = seen  # the most recent last
            while self._failures:  # forget addresses quiet for a whole window, then the quietest
                first = next(iter(self._failures.values()))
                if first[-1] > now - self.window and len(self._failures) <= self.max_addresses:
                    break
                self._failures.popitem(last=False)

    def tracked(self) -> int:
        """How many addresses are remembered now."""
        with self._lock:
            return len(self._failures)


def authorize(request: Request, api_key: str | None, throttle: AuthThrottle | None = None) -> None:
    """``APIError`` 401 unless the request carries ``Authorization: Bearer <api_key>``; with
    ``throttle``, a 429 from an address that sent too many wrong keys (counted here)."""
    if api_key is None:
        return
    address = client_address(request)
    if throttle is not None:
        throttle.check(address)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())
    if not ok:
        if throttle is not None:
            throttle.failed(address)
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


class BodyTimeout(APIError):
    """The request body did not arrive within ``body_timeout`` seconds: a 408."""

    def __init__(self, seconds: float):
        super().__init__(
            f"the request body did not arrive within {seconds:g} s",
            status=408,
            code="request_timeout",
        )


_CLOSE = (b"connection", b"close")
DRAIN_BYTES = 1 << 20  # at most this much of an unread body is read before answering
DRAIN_S = 0.5  # ... waiting at most this long for each piece


def _expects_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"transfer-encoding" or (
            name.lower() == b"content-length" and value.strip() not in (b"0", b"")
        ):
            return True
    return False


class BodyDeadline:
    """ASGI middleware: a request's body must arrive within ``seconds`` of its head.

    ``receive`` past the deadline raises :class:`BodyTimeout` (our apps answer it as a 408
    error object; for another app this middleware answers it, if no response has started). A
    response that starts before the whole body was read first reads what is left of it when
    that is small and arrives at once (:data:`DRAIN_BYTES`, :data:`DRAIN_S`); otherwise it
    carries ``Connection: close``, so that a client still sending cannot hold the connection
    (uvicorn ignores what it sends after the response, without a timeout).
    """

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        state = {"done": not _expects_body(scope.get("headers", [])), "started": False}

        async def timed_receive():
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise BodyTimeout(self.seconds) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["done"] = True
            return message

        async def drain() -> bool:
            """Read what is left of a small body that arrives at once (a 401 answered before
            the body was read): closing with unread bytes would make the kernel reset the
            connection, and the client could lose the answer."""
            drained = 0
            while not state["done"] and drained <= DRAIN_BYTES:
                wait = min(DRAIN_S, max(0.0, deadline - loop.time()))
                try:
                    message = await asyncio.wait_for(receive(), wait)
                except TimeoutError:
                    return False
                if message["type"] != "http.request":
                    return False
                drained += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
            return state["done"]

        async def closing_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                if not state["done"] and not await drain():
                    message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            await send(message)

        try:
            await self.app(scope, timed_receive, closing_send)
        except BodyTimeout as e:
            if state["started"]:
                return
            response = error_response(e, lambda text: text)
            response.headers["connection"] = "close"
            await response(scope, receive, send)


def _head_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline on the request head: a connection whose request
    line and headers have not all arrived ``seconds`` after it opened (or, for the next
    request on a kept-alive connection, ``seconds`` after the keep-alive wait) is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutH11Protocol(H11Protocol):
        head_timeout = seconds
        _head_timer: asyncio.TimerHandle | None = None

        def _arm_head_timer(self, delay: float) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(delay, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("request head not received within %g s: closed", seconds)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer(self.head_timeout)

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm_head_timer(self.timeout_keep_alive + self.head_timeout)
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

    return HeadTimeoutH11Protocol


def _limits_of(app) -> HTTPLimits:
    """The limits an app was built with (``app.state.http_limits``), else the defaults."""
    limits = getattr(getattr(app, "state", None), "http_limits", None)
    return limits if isinstance(limits, HTTPLimits) else HTTPLimits()


def _uvicorn_config(app, **kw):
    """The uvicorn config that :func:`run` and :func:`run_in_thread` both use: the app's
    :class:`HTTPLimits` applied (head and body deadlines, keep-alive, connection cap)."""
    import uvicorn

    limits = _limits_of(app)
    return uvicorn.Config(
        BodyDeadline(app, limits.body_timeout),
        interface="asgi3",
        http=_head_timeout_protocol(limits.header_timeout),
        timeout_keep_alive=limits.keep_alive,
        limit_concurrency=limits.max_connections,
        **kw,
    )


def run(app, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    server = uvicorn.Server(_uvicorn_config(app, host=host, port=port, log_level="info"))
    try:
        server.run()
    except KeyboardInterrupt:
        pass


@contextmanager
def run_in_thread(app, log_level: str = "warning") -> Iterator[str]:
    """Run an ASGI app on 127.0.0.1 (a free port) in a thread; yields its ``/v1`` base URL.

    Log records go to the ``uvicorn`` loggers (``log_config=None``: no handlers of its own).
    """
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = _uvicorn_config(app, host="127.0.0.1", port=port, log_config=None, log_level=log_level)
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
