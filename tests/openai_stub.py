"""A scripted OpenAI-compatible chat-completions server on loopback, for judge tests.

``StubServer(reply)`` serves ``POST /v1/chat/completions`` with FastAPI under uvicorn in a
background thread on ``127.0.0.1`` and a free port. ``reply`` maps the request body to the
assistant's text. ``fail_first=N`` answers the first N requests with ``fail_status`` (500 by
default, or 429); with ``echo_auth`` their message quotes the ``Authorization`` header, as a
careless proxy might. Every request body and its ``Authorization`` header are recorded.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """Runs an app under uvicorn in a background thread on 127.0.0.1 and a free port."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None)
        self._server = uvicorn.Server(config)  # log_config=None: records reach caplog
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> AppServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline and self._thread.is_alive(), "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


class StubServer:
    """Context manager running the stub; ``.base_url`` is the ``/v1`` URL to call."""

    def __init__(
        self,
        reply: Callable[[dict], str] | str = "#thescore: 1",
        fail_first: int = 0,
        fail_status: int = 500,
        echo_auth: bool = False,
        fail_headers: dict[str, str] | None = None,
    ):
        self.reply = reply if callable(reply) else (lambda body, text=reply: text)
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.echo_auth = echo_auth  # failures quote the Authorization header (leak test)
        self.fail_headers = fail_headers or {}  # e.g. {"retry-after": "0.3"}
        self.requests: list[dict] = []  # bodies of all requests, failed ones included
        self.auth_headers: list[str] = []
        self._lock = threading.Lock()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._server = uvicorn.Server(
            uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def count(self) -> int:
        return len(self.requests)

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with self._lock:
                self.requests.append(body)
                self.auth_headers.append(request.headers.get("authorization", ""))
                n = len(self.requests)
            if n <= self.fail_first:
                msg = "scripted failure"
                if self.echo_auth:
                    msg += " for " + request.headers.get("authorization", "")
                return JSONResponse(
                    {"error": {"message": msg, "type": "server_error"}},
                    status_code=self.fail_status,
                    headers=self.fail_headers,
                )
            return {
                "id": f"chatcmpl-{n}",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "stub"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.reply(body)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }

        return app

    def __enter__(self) -> StubServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("stub server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
