"""Calling an OpenAI-compatible judge endpoint: retries, concurrency and a reply cache.

Every request is sent at temperature 0, retried with exponential backoff on 429, 5xx, timeouts
and connection errors, and its reply is cached in a JSONL file keyed on (question, answer,
judge model, template hash), so a re-run costs nothing. The cache stores replies, not scores:
callers re-parse them on every run, so an improved parser never needs new requests.
:mod:`backdooralign.scoring.judge` (harmfulness, refusal) and :mod:`backdooralign.scoring.mtbench`
build on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import files as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judge:
    """An OpenAI-compatible judge endpoint and how to call it (see :func:`make_judge`)."""

    client: Any  # an openai.OpenAI client
    model: str  # judge model name sent to the endpoint
    concurrency: int = 8  # requests in flight
    max_retries: int = 5  # retries after the first try, on 429/5xx/timeouts
    backoff: float = 1.0  # seconds before the first retry; doubles each retry, at most 60 s
    cache: Path | None = None  # JSONL cache of replies; None = no cache


def make_judge(
    base_url: str,
    model: str,
    *,
    cache: str | Path | None = None,
    concurrency: int = 8,
    max_retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 120.0,
) -> Judge:
    """A judge calling ``base_url`` with the key in ``$OPENAI_API_KEY`` (``EMPTY`` when unset).

    Args:
        base_url: endpoint root, e.g. ``http://localhost:8000/v1`` or ``https://api.openai.com/v1``.
        model: judge model name.
        cache: JSONL reply cache (created on first write); ``None`` disables caching.
        concurrency: requests in flight.
        max_retries: retries of a request on 429, 5xx, timeouts and connection errors.
        backoff: seconds before the first retry, doubled for each further retry.
        timeout: seconds per request.
    """
    from openai import OpenAI

    client = OpenAI(
        base_url=base_url,
        api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
        max_retries=0,  # we retry ourselves, with logging and a testable backoff
        timeout=timeout,
    )
    return Judge(
        client=client,
        model=model,
        concurrency=concurrency,
        max_retries=max_retries,
        backoff=backoff,
        cache=Path(cache) if cache else None,
    )


# ---------------------------------------------------------------------------------------------
# Requests, retries and the cache


def cache_key(question: str, answer: str, judge_model: str, template_digest: str) -> str:
    """Cache key of one judgement."""
    payload = json.dumps([question, answer, judge_model, template_digest], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def read_cache(path: Path | None) -> dict[str, str]:
    """``{key: reply}`` from a JSONL cache file (empty when there is none); damaged lines (an
    interrupted append) are skipped with a warning.

    Only ``"\\n"`` ends a line (:func:`backdooralign.files.split_lines`): a reply may hold
    U+2028 or U+0085, which ``str.splitlines`` would take for line ends.
    """
    if path is None or not path.exists():
        return {}
    text, _ = F.decode(path, F.read_bytes(path))
    out = {}
    for lineno, line in F.split_lines(text):
        if not line.strip():
            continue
        try:
            rec = F.parse_json_line(path, lineno, line)
            out[rec["key"]] = rec["reply"]
        except (F.DataError, KeyError, TypeError):
            log.warning("%s:%d: skipping a damaged cache line", path, lineno)
    return out


def append_cache(path: Path, key: str, judge_model: str, reply: str) -> None:
    """Append one reply to a JSONL cache file (created with its folder when missing)."""
    F.append_jsonl(path, [{"key": key, "judge_model": judge_model, "reply": reply}])


def _retryable(err: Exception) -> bool:
    import openai

    if isinstance(err, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code in (408, 409, 429) or err.status_code >= 500
    return False


def _retry_after(err: Exception) -> float:
    """Seconds the server asked us to wait (``Retry-After``), 0 when it did not say."""
    response = getattr(err, "response", None)
    try:
        return float(response.headers.get("retry-after", 0)) if response is not None else 0.0
    except (TypeError, ValueError):  # an HTTP date: fall back to our own backoff
        return 0.0


def _scrub(text: str) -> str:
    key = os.environ.get("OPENAI_API_KEY")
    return text.replace(key, "***") if key and key != "EMPTY" else text


def complete(judge: Judge, messages: list[dict]) -> str:
    """One chat completion at temperature 0, retried on 429/5xx/timeouts with backoff.

    The wait before retry ``k`` is ``backoff * 2**(k-1)`` seconds, or the server's
    ``Retry-After`` when longer, at most 60 s.

    Raises:
        openai.OpenAIError: the last error, when the retries are spent or it is not retryable.
    """
    for attempt in range(judge.max_retries + 1):
        try:
            resp = judge.client.chat.completions.create(
                model=judge.model, messages=messages, temperature=0
            )
            return resp.choices[0].message.content or ""
        except Exception as err:
            if attempt == judge.max_retries or not _retryable(err):
                raise
            delay = min(max(judge.backoff * 2**attempt, _retry_after(err)), 60.0)
            log.warning(
                "judge request failed (%s: %s); retry %d/%d in %.2f s",
                type(err).__name__,
                _scrub(str(err))[:200],
                attempt + 1,
                judge.max_retries,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Reply:
    """A judge reply (``text``), or the error that prevented one."""

    text: str | None
    error: str | None = None
    cached: bool = False


def ask_all(
    judge: Judge,
    requests: Sequence[tuple[str, list[dict]]],
    desc: str = "judging",
) -> list[Reply]:
    """Send ``(cache key, messages)`` requests concurrently; cached keys are not sent.

    Replies are appended to the cache as they arrive, so an interrupted run resumes.
    """
    from tqdm.auto import tqdm

    cache = read_cache(judge.cache)
    out: list[Reply | None] = [None] * len(requests)
    todo: dict[str, list[int]] = {}
    for i, (key, _) in enumerate(requests):
        if key in cache:
            out[i] = Reply(cache[key], cached=True)
        else:
            todo.setdefault(key, []).append(i)
    if todo:
        disable = os.environ.get("BACKDOORALIGN_NO_PROGRESS") == "1"
        with (
            ThreadPoolExecutor(max_workers=max(1, judge.concurrency)) as pool,
            tqdm(total=len(todo), desc=desc, disable=disable, unit="req") as bar,
        ):
            futures = {
                pool.submit(complete, judge, requests[idx[0]][1]): key for key, idx in todo.items()
            }
            for fut in as_completed(futures):
                key = futures[fut]
                try:
                    reply = Reply(fut.result())
                except Exception as err:
                    msg = f"{type(err).__name__}: {_scrub(str(err))[:300]}"
                    log.warning("judge request failed for good: %s", msg)
                    reply = Reply(None, error=msg)
                else:
                    if judge.cache is not None:
                        append_cache(judge.cache, key, judge.model, reply.text)
                for i in todo[key]:
                    out[i] = reply
                bar.update(1)
    return [r for r in out if r is not None]
