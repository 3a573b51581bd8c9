"""The connection limits both servers share (``serving.http``): wrong API keys counted per client
address (:class:`AuthThrottle`, with fake addresses and a fake clock), and what the runner's
deadlines leave alone (a kept-alive connection serves its next request). The servers' own
tests (``test_serve.py``, ``test_service.py``) check the 429s, 408s and closed connections
over loopback."""

from __future__ import annotations

import socket

import pytest
from conftest import AppServer
from fastapi import FastAPI, Request

from backdooralign.serving.http import (
    APIError,
    AuthThrottle,
    HTTPLimits,
    answer_errors_as_json,
    read_body,
)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _blocked(throttle: AuthThrottle, address: str) -> int | None:
    """``Retry-After`` of the 429 the address gets now, or ``None`` when it is let through."""
    try:
        throttle.check(address)
    except APIError as e:
        assert (e.status, e.type, e.code) == (429, "rate_limit_error", "rate_limit_exceeded")
        return e.retry_after
    return None


def test_an_address_is_blocked_after_the_limit_and_others_are_not():
    clock = Clock()
    throttle = AuthThrottle(10, 60, clock=clock)
    for _ in range(10):
        assert _blocked(throttle, "10.0.0.1") is None
        throttle.failed("10.0.0.1")
        clock.now += 1
    assert _blocked(throttle, "10.0.0.1") == 50  # the first failure leaves the window in 50 s
    assert _blocked(throttle, "10.0.0.2") is None  # another address
    throttle.failed("10.0.0.2")
    assert _blocked(throttle, "10.0.0.2") is None
    clock.now += 49.5
    assert _blocked(throttle, "10.0.0.1") == 1
    clock.now += 0.5
    assert _blocked(throttle, "10.0.0.1") is None  # the window slid past the first failure
    throttle.failed("10.0.0.1")
    assert _blocked(throttle, "10.0.0.1") == 1  # ... and the next one is as old as it was


def test_the_tracked_addresses_are_bounded_and_quiet_ones_forgotten():
    clock = Clock()
    throttle = AuthThrottle(3, 60, max_addresses=100, clock=clock)
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert throttle.tracked() == 100  # the most recent 100
    for _ in range(3):
        throttle.failed("192.0.2.1")
    assert _blocked(throttle, "192.0.2.1") == 60
    clock.now += 61
    throttle.failed("192.0.2.9")
    assert throttle.tracked() == 1  # everything older than the window is gone


def test_limits_out_of_range_are_refused():
    with pytest.raises(ValueError):
        AuthThrottle(0, 60)


def test_a_kept_alive_connection_serves_its_next_request():
    app = FastAPI()
    answer_errors_as_json(app, lambda text: text)
    app.state.http_limits = HTTPLimits(header_timeout=1.0, body_timeout=1.0)

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await read_body(request, 100))}

    with AppServer(app) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            for body in (b"abc", b"defgh"):
                s.sendall(
                    b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                )
                s.sendall(body)
                answer = b""
                while not answer.endswith(b"}"):
                    answer += s.recv(4096)
                assert answer.startswith(b"HTTP/1.1 200 ")
                assert b"connection: close" not in answer.lower()
                assert answer.endswith(b'{"bytes":%d}' % len(body))
