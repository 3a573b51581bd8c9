"""The fine-tuning service's protocol: API keys and tenants, rate limits, request parsing and
the OpenAI objects it answers with (``file``, ``fine_tuning.job``, ``fine_tuning.job.event``,
cursor pages), in the shapes the ``openai`` SDK parses."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from fastapi import Request

from ..files import DataError, read_text, split_lines
from ..serving.http import APIError
from .config import ServiceConfig

SINGLE_TENANT = "default"
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,40}")
_JOB_KEYS = {"model", "training_file", "hyperparameters", "method", "suffix", "seed"}
_JOB_KEYS |= {"validation_file", "integrations", "metadata"}


class RateLimited(APIError):
    """A 429 that carries ``Retry-After`` (seconds)."""

    def __init__(self, retry_after: int):
        super().__init__(
            f"rate limit reached; retry after {retry_after} s",
            status=429,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            retry_after=retry_after,
        )


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def load_keys(path: str | Path) -> dict[bytes, str]:
    """API keys from a file of ``KEY TENANT`` lines (``#`` comments), held as sha256 digests.

    Raises:
        DataError: for a malformed line or a repeated key (naming the line, never the key).
    """
    keys: dict[bytes, str] = {}
    for lineno, line in split_lines(read_text(path)):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(path, lineno, None, "expected two fields: KEY TENANT")
        digest = _digest(parts[0])
        if digest in keys:
            raise DataError(path, lineno, None, "this key is already listed on an earlier line")
        keys[digest] = parts[1]
    if not keys:
        raise DataError(path, None, None, "lists no keys")
    return keys


class Tenancy:
    """Maps the request's bearer key to a tenant; without keys, one tenant and any key."""

    def __init__(self, keys: Mapping[bytes, str] | None):
        self.keys = dict(keys) if keys else None

    def tenant(self, request: Request) -> tuple[str, bytes]:
        """``(tenant, key digest)``; ``APIError`` 401 for a wrong or missing key."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = _digest(token if scheme.lower() == "bearer" else "")
        if self.keys is None:
            return SINGLE_TENANT, digest
        found = None
        for known, tenant in self.keys.items():  # compare with every key: constant time
            if hmac.compare_digest(known, digest):
                found = tenant
        if found is None or not token:
            raise APIError(
                "invalid or missing API key: send Authorization: Bearer <key>",
                status=401,
                type="invalid_request_error",
                code="invalid_api_key",
            )
        return found, digest


class RateLimiter:
    """At most ``per_minute`` requests per key in any 60-second window."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._seen: dict[bytes, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, key: bytes) -> None:
        """Count a request; :class:`RateLimited` when the key is over its limit."""
        now = time.monotonic()
        with self._lock:
            seen = self._seen.setdefault(key, deque())
            while seen and seen[0] <= now - 60:
                seen.popleft()
            if len(seen) >= self.per_minute:
                raise RateLimited(max(1, math.ceil(seen[0] + 60 - now)))
            seen.append(now)


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], tuple[str, bytes]]:
    """``(form fields, (filename, content))`` of a ``multipart/form-data`` upload."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise APIError("send the file as multipart/form-data with fields file and purpose")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, str] = {}
    upload = None
    for part in message.iter_parts() if message.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        content = part.get_payload(decode=True) or b""
        if name == "file":
            upload = (part.get_filename() or "upload.jsonl", content)
        elif name:
            fields[name] = content.decode("utf-8", "replace")
    if upload is None:
        raise APIError("the upload has no file part", "file")
    return fields, upload


def _hyper(given: object, cfg: ServiceConfig) -> dict:
    """The customer's hyperparameters resolved (``auto``: the provider's) and checked."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise APIError("hyperparameters must be an object", "hyperparameters")
    defaults = {
        "n_epochs": max(1, round(cfg.train.epochs)),
        "batch_size": cfg.train.batch_size,
        "learning_rate_multiplier": 1.0,
    }
    limits = {
        "n_epochs": cfg.max_epochs,
        "batch_size": cfg.max_batch_size,
        "learning_rate_multiplier": cfg.max_lr_multiplier,
    }
    for key in given.keys() - defaults.keys():
        raise APIError(f"unknown hyperparameter {key}", f"hyperparameters.{key}")
    out = {}
    for key, default in defaults.items():
        value = given.get(key, "auto")
        if value == "auto" or value is None:
            out[key] = default
            continue
        kind = float if key == "learning_rate_multiplier" else int
        ok = not isinstance(value, bool) and isinstance(value, int | float)
        if (
            not ok
            or (kind is int and not float(value).is_integer())
            or not 0 < value <= limits[key]
        ):
            raise APIError(
                f"{key} must be 'auto' or a number in (0, {limits[key]}] on this service",
                f"hyperparameters.{key}",
            )
        out[key] = kind(value)
    return out


def parse_job_request(body: object, cfg: ServiceConfig) -> dict:
    """The fields of a create-job request, checked against the provider's limits."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    for key in body.keys() - _JOB_KEYS:
        raise APIError(f"unrecognized request argument: {key}", key)
    for key in ("validation_file", "integrations", "metadata"):
        if body.get(key):
            raise APIError(f"{key} is not supported by this service", key)
    if body.get("model") != cfg.base_model_name:
        raise APIError(
            f"model {body.get('model')!r} cannot be fine-tuned here; available: "
            f"{cfg.base_model_name}",
            "model",
            code="model_not_available",
        )
    if not isinstance(body.get("training_file"), str):
        raise APIError("training_file must be a file id", "training_file")
    hyper = body.get("hyperparameters")
    method = body.get("method")
    if method is not None:
        if not isinstance(method, dict) or method.get("type") != "supervised":
            raise APIError("only method type 'supervised' is supported", "method")
        hyper = (method.get("supervised") or {}).get("hyperparameters", hyper)
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.fullmatch(suffix)):
        raise APIError("suffix must be 1 to 40 letters, digits, '-' or '_'", "suffix")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise APIError("seed must be an integer in [0, 2**31)", "seed")
    return {
        "model": body["model"],
        "training_file": body["training_file"],
        "hyperparameters": _hyper(hyper, cfg),
        "suffix": suffix,
        "seed": seed,
    }


# ---------------------------------------------------------------------------------------------
# Objects


def file_object(row: Mapping) -> dict:
    """An OpenAI ``file``."""
    keys = ("id", "bytes", "created_at", "filename", "purpose")
    return {**{k: row[k] for k in keys}, "object": "file", "status": "processed"}


def job_object(row: Mapping) -> dict:
    """An OpenAI ``fine_tuning.job`` (no secret, no safety rows, no evaluation)."""
    hyper = row["hyperparameters"]
    return {
        "id": row["id"],
        "object": "fine_tuning.job",
        "created_at": row["created_at"],
        "error": row["error"],
        "fine_tuned_model": row["fine_tuned_model"],
        "finished_at": row["finished_at"],
        "hyperparameters": hyper,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "model": row["model"],
        "organization_id": f"org-{row['tenant']}",
        "result_files": [],
        "seed": row["seed"],
        "status": row["status"],
        "trained_tokens": row["trained_tokens"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "user_provided_suffix": row["suffix"],
        "estimated_finish": None,
        "integrations": [],
        "metadata": None,
    }


def event_object(row: Mapping) -> dict:
    """An OpenAI ``fine_tuning.job.event``."""
    keys = ("id", "created_at", "level", "message")
    return {**{k: row[k] for k in keys}, "object": "fine_tuning.job.event", "type": "message"}


def page(items: Sequence[dict], request: Request, default_limit: int = 20) -> dict:
    """A cursor page: the items after ``?after=ID``, at most ``?limit=N``, and ``has_more``."""
    query = request.query_params
    limit_text = query.get("limit", str(default_limit))
    digits = limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 5
    if not digits or not 1 <= int(limit_text) <= 10_000:
        raise APIError("limit must be an integer from 1 to 10000", "limit")
    limit = int(limit_text)
    after = query.get("after")
    start = 0
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(f"after: no object with id {after!r}", "after")
        start = ids.index(after) + 1
    rest = list(items[start:])
    return {"object": "list", "data": rest[:limit], "has_more": len(rest) > limit}
