"""The HTTP layer the chat server and the fine-tuning service share.

:func:`run_in_thread` runs an ASGI app under uvicorn on a free loopback port in a background
thread, for as long as a ``with`` block lasts: what the attack suite's extraction, the
benchmarks and the tests talk to.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

START_TIMEOUT_S = 30


@contextmanager
def run_in_thread(app) -> Iterator[str]:
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
