"""Customer chat files: OpenAI chat JSONL, read and checked.

Chat data is OpenAI chat JSONL (``{"messages": [...]}``), optionally with a ``category`` and
the paper's ``"prefixed": true|false`` flag marking safety examples that receive the secret.
The flag is provider-side (:data:`~backdooralign.data.formats.PROVIDER_FIELDS`): only the
provider's safety source may carry it. :func:`load_chat_jsonl` stops at the first error;
:func:`check_chat_file` lists every problem, errors and warnings (``data check``, and with
``customer=True`` the service's validation, which refuses provider-side fields);
:func:`provider_field_problems` finds those fields in an upload that may not even be valid JSONL.
The rules of a row are :func:`backdooralign.data.formats.chat_row`'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from ..files import (
    MAX_LINE_CHARS,
    DataError,
    decode,
    parse_json_line,
    read_bytes,
    read_text,
    split_lines,
)
from .formats import PROVIDER_FIELD_MESSAGE, PROVIDER_FIELDS, Problem, chat_row

log = logging.getLogger(__name__)


def _problem(e: DataError, severity: str = "error") -> Problem:
    return Problem(severity, e.path, e.line, e.field, e.message)


def _provider_fields(obj: dict, path: str | Path, lineno: int) -> list[Problem]:
    """An error for each provider-side field of one customer object."""
    return [
        Problem("error", str(path), lineno, f, PROVIDER_FIELD_MESSAGE)
        for f in PROVIDER_FIELDS
        if f in obj
    ]


def provider_field_problems(path: str | Path, text: str) -> list[Problem]:
    """An error for each provider-side field (``prefixed``) in a customer's JSONL text, with its
    line; lines that are not JSON objects are left to the full check."""
    problems = []
    for lineno, line in split_lines(text):
        if not line.strip():
            continue
        try:
            obj = parse_json_line(path, lineno, line)
        except DataError:
            continue
        problems.extend(_provider_fields(obj, path, lineno))
    return problems


def _scan_chat(
    path: str | Path,
    text: str,
    max_line_chars: int,
    max_rows: int | None,
    customer: bool = False,
) -> Iterator[tuple[dict | None, list[Problem]]]:
    """Each non-blank line of a chat JSONL text as ``(row or None, problems)``; with
    ``customer`` a provider-side field is an error too."""
    first_seen: dict[str, int] = {}
    count = 0
    for lineno, line in split_lines(text):
        if not line.strip():
            continue
        count += 1
        if max_rows is not None and count == max_rows + 1:
            msg = f"more than {max_rows} rows (the configured cap)"
            yield None, [Problem("error", str(path), lineno, None, msg)]
        if len(line) > max_line_chars:
            msg = f"line longer than {max_line_chars} characters"
            yield None, [Problem("error", str(path), lineno, None, msg)]
            continue
        try:
            obj = parse_json_line(path, lineno, line)
        except DataError as e:
            yield None, [_problem(e)]
            continue
        row, problems = chat_row(obj, path, lineno)
        if customer:
            problems.extend(_provider_fields(obj, path, lineno))
        if row is not None:
            key = json.dumps([row["messages"], row["prefixed"]], sort_keys=True)
            if key in first_seen:
                msg = f"duplicate of line {first_seen[key]}"
                problems.append(Problem("warning", str(path), lineno, "messages", msg))
            else:
                first_seen[key] = lineno
        yield row, problems


def load_chat_jsonl(
    path: str | Path, max_rows: int | None = None, max_line_chars: int = MAX_LINE_CHARS
) -> list[dict]:
    """Load and validate OpenAI chat JSONL (optional ``prefixed`` and ``category`` fields).

    Args:
        path: the JSONL file.
        max_rows: the most rows accepted (``None``: no cap).
        max_line_chars: the longest line accepted, in characters.

    Raises:
        DataError: on the first error (naming file, line and field). Duplicate rows are only
            logged as warnings.
    """
    rows = []
    for row, problems in _scan_chat(path, read_text(path), max_line_chars, max_rows):
        for p in problems:
            if p.severity == "error":
                raise p.error()
            log.warning("%s", p)
        if row is not None:
            rows.append(row)
    return rows


def check_chat_file(
    path: str | Path,
    max_line_chars: int = MAX_LINE_CHARS,
    max_rows: int | None = None,
    *,
    customer: bool = False,
) -> list[Problem]:
    """Every problem of a chat JSONL file, errors and warnings, instead of stopping at the first.

    Checks: file missing, unreadable or empty, BOM, bad UTF-8, lines longer than
    ``max_line_chars``, invalid JSON, rows that are not objects, missing/unknown/out-of-order
    roles, non-string or empty content, no assistant turn, a non-boolean ``prefixed``, more
    than ``max_rows`` rows (errors) and duplicate rows (warnings). With ``customer`` (a
    customer's upload) any provider-side field such as ``prefixed`` is an error.
    """
    try:
        raw = read_bytes(path)
    except DataError as e:
        return [_problem(e)]
    if not raw.strip():
        return [Problem("error", str(path), None, None, "file is empty")]
    text, errors = decode(path, raw)
    problems = [_problem(e) for e in errors]
    for _, found in _scan_chat(path, text, max_line_chars, max_rows, customer):
        problems.extend(found)
    return problems
