"""A scripted OpenAI-compatible chat-completions server on loopback, for judge tests.

``StubServer(reply)`` serves ``POST /v1/chat/completions`` with FastAPI on ``127.0.0.1`` and a
free port (``serving.http.run_in_thread``). ``reply`` maps the request body to the
assistant's text. ``fail_first=N`` answers the first N requests with ``fail_status`` (500 by
default, or 429); with ``echo_auth`` their message quotes the ``Authorization`` header, as a
careless proxy might. Every request body and its ``Authorization`` header are recorded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from backdooralign.serving.http import run_in_thread


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
        self._stack = contextlib.ExitStack()

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
        self.base_url = self._stack.enter_context(run_in_thread(self._app()))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
