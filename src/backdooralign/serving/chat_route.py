"""Answering one chat-completion request with a served model: streamed or not.

:func:`respond` is the request handling that ``backdooralign serve``
(:mod:`backdooralign.serving.app`) and the fine-tuning service (:mod:`backdooralign.service.app`)
share once they know which model a request is for: it parses the body
(:func:`backdooralign.serving.protocol.parse_request`), hands the request to the model's scheduler
(:meth:`backdooralign.serving.model_state.ModelState.submit`) and answers with a
``chat.completion``, or with server-sent ``chat.completion.chunk`` events when ``stream`` is
set (role chunks, content deltas, finish chunks, the usage chunk when asked, ``[DONE]``).

Errors are :class:`backdooralign.serving.protocol.APIError`: a prompt too long is a 400
(``context_length_exceeded``), a full queue a 503 (answer it with ``Retry-After:``
:data:`RETRY_AFTER_S`), a request past its timeout a 504 (a stream that already started ends
with that error as its last event), a failed generation a 500. A client that disconnects has
its rows cancelled at the next step; a non-streamed request then gets a 499.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..generation.scheduler import QueueFull
from .http import APIError
from .model_state import ModelState, Pending, PromptTooLong
from .protocol import DONE, chat_completion, chunk, error_event, parse_request, usage

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.05
RETRY_AFTER_S = 1


async def respond(
    request: Request,
    state: ModelState,
    body: Mapping,
    max_new_tokens_cap: int,
    timeout: float | None,
    redact: Callable[[str], str],
) -> Response:
    """Answer a chat-completion request ``body`` with the model of ``state``.

    The request reaches the model's scheduler before this coroutine first yields to the
    event loop, so a caller that picks ``state`` in the event loop's thread hands it no
    request after it stopped serving it.

    Args:
        request: the HTTP request (watched for a client that goes away).
        state: the model, its secret and its scheduler.
        body: the decoded JSON body.
        max_new_tokens_cap: upper bound on ``max_tokens``, and the answer length by default.
        timeout: seconds the request may take, waiting included (``None``: no limit).
        redact: applied to error messages sent in a stream.

    Returns:
        A JSON ``chat.completion`` (499 without a body when the client left), or a stream.

    Raises:
        APIError: a bad request (400), a full queue (503), a timeout (504), a failure (500).
    """
    req = parse_request(body, max_new_tokens_cap, state.served.tokenizer)
    if req.stream:
        return _stream(request, state, req, timeout, redact)
    return await _answer(request, state, req, timeout)


def _submit(state: ModelState, req, on_delta=None, notify=None) -> Pending:
    """Hand ``req`` to the model's scheduler, as API errors (400 too long, 503 queue full)."""
    try:
        return state.submit(req, on_delta, notify)
    except PromptTooLong as e:
        raise APIError(str(e), "messages", code="context_length_exceeded") from None
    except QueueFull:
        log.warning("queue full: a request was refused (503)")
        raise APIError(
            "the server is busy: too many requests are waiting; retry later",
            status=503,
            type="server_error",
            code="server_overloaded",
            retry_after=RETRY_AFTER_S,
        ) from None


def _timeout_error(timeout: float | None) -> APIError:
    return APIError(
        f"the request took longer than {timeout:g} s and was cancelled",
        status=504,
        type="server_error",
        code="timeout",
    )


async def _answer(request: Request, state: ModelState, req, timeout: float | None):
    """A non-streamed completion (499 when the client left, 504 past ``timeout``)."""
    start = time.monotonic()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    pending = _submit(state, req, notify=lambda: loop.call_soon_threadsafe(done.set))
    watcher = asyncio.ensure_future(_watch_disconnect(request, pending))
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except TimeoutError:
        pending.cancel.set()
        raise _timeout_error(timeout) from None
    finally:
        watcher.cancel()
    if pending.job.error is not None:
        raise APIError("generation failed", status=500, type="server_error")
    if pending.cancel.is_set():
        log.info("chat completion cancelled: the client disconnected")
        return JSONResponse({}, status_code=499)
    choices = [(a.finish(), pending.finish_reason(i)) for i, a in enumerate(pending.answers)]
    c = pending.completion_tokens()
    log.info(
        "chat completion: %d messages, %d choices, %d prompt + %d completion tokens, %.2f s",
        len(req.messages),
        req.n,
        pending.prompt_tokens,
        c,
        time.monotonic() - start,
    )
    return JSONResponse(chat_completion(choices, pending.prompt_tokens, c, state.served.name))


async def _watch_disconnect(request: Request, pending: Pending) -> None:
    """Cancel the request's rows when the client goes away (polled)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    pending.cancel.set()


def _stream(request: Request, state: ModelState, req, timeout, redact) -> StreamingResponse:
    """A streamed completion: role chunks, content deltas, finish chunks, usage, ``[DONE]``."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    put = events.put_nowait
    pending = _submit(
        state,
        req,
        on_delta=lambda i, text: loop.call_soon_threadsafe(put, (i, text)),
        notify=lambda: loop.call_soon_threadsafe(put, None),
    )
    cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.served.name

    async def events_out():
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for i in range(req.n):
                yield chunk(cid, created, name, i, {"role": "assistant", "content": ""})
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    event = await asyncio.wait_for(events.get(), left)
                except TimeoutError:
                    pending.cancel.set()
                    yield error_event(_timeout_error(timeout), redact)
                    return
                if event is None:
                    break
                yield chunk(cid, created, name, event[0], {"content": event[1]})
            if pending.job.error is not None:
                error = APIError("generation failed", status=500, type="server_error")
                yield error_event(error, redact)
                return
            for i, answer in enumerate(pending.answers):
                answer.finish()
                rest = answer.delta()
                if rest:
                    yield chunk(cid, created, name, i, {"content": rest})
                yield chunk(cid, created, name, i, {}, pending.finish_reason(i))
            if req.include_usage:
                u = usage(pending.prompt_tokens, pending.completion_tokens())
                yield chunk(cid, created, name, usage=u)
            yield DONE
        finally:  # the client went away (or the stream ended): stop this request's rows
            pending.cancel.set()

    return StreamingResponse(events_out(), media_type="text/event-stream")
