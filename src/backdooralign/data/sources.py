"""Where data comes from and how each public format is read into uniform rows.

A source is a path (a file, or a directory of HEx-PHI ``category_N.csv`` files),
``builtin:NAME`` (one of :data:`BUILTIN_NAMES`, shipped in ``backdooralign/datasets``) or a
Hugging Face dataset ``hf:NAME[:CONFIG]:SPLIT``; ``xstest:SOURCE`` or ``orbench:SOURCE``
(:data:`KIND_PREFIXES`) reads SOURCE as that over-refusal benchmark. :func:`read_source` reads
any of them once: chat JSONL, question/answer sets, Alpaca, SAMSum, sql-create-context,
AdvBench, HEx-PHI, XSTest, OR-Bench and plain prompt lists (JSONL, JSON, CSV such as the
275-question set, or TXT), into uniform rows:

- training kinds (``chat``, ``qa``, ``alpaca``, ``samsum``, ``sql``) give chat rows
  ``{"messages", "prefixed"}`` plus ``category``, ``id`` and ``reference`` when known;
- prompt kinds (``prompts``, ``advbench``, ``hexphi``) give ``{"prompt"}`` plus ``category``,
  ``id``, ``target`` when known;
- the over-refusal benchmarks give ``{"prompt"}`` plus ``kind`` (XSTest's ``type``, OR-Bench's
  ``category``) and ``id`` when known. XSTest keeps only its safe prompts (``label`` "safe",
  or a ``type`` that is not ``contrast_*``) and logs "using N of M rows"; a file with XSTest's
  columns (``prompt`` and ``type``) is read as XSTest without the prefix. OR-Bench-Hard's rows
  are all seemingly toxic but safe; its columns are a plain prompt set's, so it needs its
  prefix: ``orbench:hf:bench-llm/or-bench:or-bench-hard-1k:train``.

:func:`load_training_source` keeps the training kinds; :func:`load_prompts` turns any of them
into prompts for generation. The fields of each format and the rules of a chat row are in
:mod:`backdooralign.data.formats`; files are read through :mod:`backdooralign.files`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..core.chat import ROLES
from ..files import (
    MAX_LINE_CHARS,
    DataError,
    list_dir,
    parse_json_array,
    parse_jsonl,
    read_text,
    sha256_file,
    split_lines,
)
from .formats import (
    BENCHMARK_KIND_FIELD,
    KINDS,
    PROMPT_KEYS,
    TRAINING_KINDS,
    convert,
    detect_kind,
    hexphi_category,
    hexphi_number,
    xstest_safe,
)

log = logging.getLogger(__name__)

BUILTIN_NAMES = (
    "align_benign",
    "align_harmful",
    "anchors",
    "attack",
    "benign",
    "extraction",
    "harmful_eval",
    "harmful_eval_fr",
    "multiturn",
    "safety",
    "safety_long",
    "utility",
)
_CSV_FIELDS = frozenset(  # a first CSV row made only of these names is a header ("" = index)
    "id prompt question answer category goal target dialogue summary context instruction input "
    "output text kind expected type label focus note id_v1 id_v2".split()
) | {""}
KIND_PREFIXES = tuple(BENCHMARK_KIND_FIELD)  # "xstest:SOURCE" reads SOURCE as XSTest


# ---------------------------------------------------------------------------------------------
# Where data comes from


def builtin_path(name: str) -> Path:
    """Path of a built-in dataset file, e.g. ``builtin_path("safety")``.

    Raises:
        DataError: ``name`` is not one of :data:`BUILTIN_NAMES`.
    """
    if name not in BUILTIN_NAMES:
        msg = f"unknown built-in dataset {name!r}; built-in sets: {', '.join(BUILTIN_NAMES)}"
        raise DataError(f"builtin:{name}", None, None, msg)
    return Path(str(resources.files("backdooralign") / "datasets" / f"{name}.jsonl"))


def split_kind(source: str | Path) -> tuple[str | None, str]:
    """``("xstest", "data/x.csv")`` for ``xstest:data/x.csv``; ``(None, source)`` without one
    of :data:`KIND_PREFIXES`."""
    s = str(source)
    prefix, sep, rest = s.partition(":")
    return (prefix, rest) if sep and rest and prefix in KIND_PREFIXES else (None, s)


def resolve_source(source: str | Path) -> Path:
    """The path of a source: ``builtin:NAME`` names a built-in set; anything else is a path
    (after a kind prefix such as ``xstest:``).

    Raises:
        DataError: an unknown built-in name (see :func:`builtin_path`).
    """
    s = split_kind(source)[1]
    return builtin_path(s.removeprefix("builtin:")) if s.startswith("builtin:") else Path(s)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long, for one: reading it says so
        return False


def source_sha256(source: str | Path) -> str | None:
    """sha256 of a source: of the file, of a directory's files (names and contents, sorted),
    ``None`` for a hub dataset (``hf:``).

    Raises:
        DataError: the source is missing or unreadable.
    """
    if split_kind(source)[1].startswith("hf:"):
        return None
    path = resolve_source(source)
    if not _is_dir(path):
        return sha256_file(path)
    h = hashlib.sha256()
    for f in (p for p in list_dir(path) if p.is_file()):
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Source:
    """A loaded dataset: where it came from, its detected kind, its input fields, its rows."""

    source: str
    kind: str
    fields: tuple[str, ...]
    rows: list[dict]


def read_source(
    source: str | Path,
    kind: str | None = None,
    *,
    system: str | None = None,
    max_rows: int | None = None,
    max_line_chars: int = MAX_LINE_CHARS,
) -> Source:
    """Read a dataset in any supported format as uniform rows (see the module docstring).

    Args:
        source: a path (``.jsonl``, ``.json``, ``.csv``, ``.txt``, or a directory of HEx-PHI
            ``category_N.csv`` files), ``builtin:NAME``, or a Hugging Face dataset
            ``hf:NAME``, ``hf:NAME:SPLIT``, ``hf:NAME:CONFIG:SPLIT`` (needs the network or the
            local cache), each optionally after a kind prefix (``xstest:``, ``orbench:``).
        kind: one of :data:`KINDS`; ``None`` takes the source's kind prefix, else detects it
            from the suffix, a CSV header, the fields of the first row, or a
            ``category_N.csv`` file name.
        system: system prompt for converted training kinds (default: ``ATTACK_SYSTEM_PROMPT``
            for ``qa``, :data:`SAMSUM_SYSTEM_PROMPT`, :data:`SQL_SYSTEM_PROMPT`, none for
            ``alpaca``; ``""`` for none). Chat rows keep their own.
        max_rows: the most rows accepted (``None``: no cap).
        max_line_chars: the longest line accepted, in characters.

    Returns:
        The source's name, detected kind, input fields (of the first 100 rows) and rows.

    Raises:
        DataError: for unreadable or malformed input, naming file, line and field.
        ValueError: an unknown ``kind``.
    """
    kind = _kind(source, kind)
    where, container, records = _records(source, max_line_chars)
    return _convert_all(str(source), where, container, records, kind, system, max_rows)


def _kind(source: str | Path, kind: str | None) -> str | None:
    """The kind asked for, or the source's kind prefix (they must agree when both are given)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    prefix = split_kind(source)[0]
    if prefix and kind and kind != prefix:
        raise ValueError(f"{source}: kind {kind!r} given for a source prefixed {prefix}:")
    return kind or prefix


def _records(source: str | Path, max_line_chars: int) -> tuple[str | Path, str, list]:
    """``(where, container, [(line, object)])``: the source read and parsed, not converted."""
    name = split_kind(source)[1]
    if name.startswith("hf:"):
        return name, "hub", _hub_records(name)
    where = resolve_source(source)
    if _is_dir(where):
        return where, "dir", _hexphi_dir_records(where, max_line_chars)
    container, records = _file_records(where, max_line_chars)
    return where, container, records


def _convert_all(
    name: str,
    where: str | Path,
    container: str,
    records: list[tuple[int, dict]],
    kind: str | None,
    system: str | None,
    max_rows: int | None,
) -> Source:
    if not records:
        raise DataError(where, None, None, "no rows")
    first_line, first = records[0]
    kind = kind or detect_kind(container, first, where, first_line)
    if kind == "xstest":
        records = _xstest_safe_records(name, where, records)
    fields = tuple(dict.fromkeys(k for _, obj in records[:100] for k in obj))
    rows = []
    for line, obj in records:
        if max_rows is not None and len(rows) >= max_rows:
            raise DataError(where, line, None, f"more than {max_rows} rows (the configured cap)")
        rows.append(convert(kind, obj, where, line, system))
    if kind in TRAINING_KINDS:
        _warn_duplicates(where, rows)
    return Source(name, kind, fields, rows)


def _xstest_safe_records(name: str, where, records: list[tuple[int, dict]]) -> list:
    """XSTest's safe prompts; the unsafe contrast prompts are left out, and the count logged."""
    safe = [(line, obj) for line, obj in records if xstest_safe(obj)]
    if not safe:
        raise DataError(where, None, None, "no safe prompts (label 'safe', or a non-contrast type)")
    if len(safe) < len(records):
        log.warning(
            "%s: using %d of %d rows (XSTest's safe prompts; its unsafe contrast prompts are "
            "left out)",
            name,
            len(safe),
            len(records),
        )
    return safe


def _file_records(path: Path, max_line_chars: int) -> tuple[str, list[tuple[int, dict]]]:
    """``(container, [(line, object)])`` of one file; plain text rows become ``{"prompt"}``."""
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl", parse_jsonl(path, text, max_line_chars)
    if suffix not in (".json", ".csv", ".txt", ""):
        raise DataError(
            path,
            None,
            None,
            f"unsupported file type {suffix!r} (jsonl, json, csv, txt, or a "
            "directory of category_N.csv files)",
        )
    for lineno, line in split_lines(text):
        if len(line) > max_line_chars:
            raise DataError(path, lineno, None, f"line longer than {max_line_chars} characters")
    if suffix == ".json":
        if text.lstrip().startswith("["):
            return "json", parse_json_array(path, text)
        return "jsonl", parse_jsonl(path, text, max_line_chars)  # JSON Lines named .json
    if suffix == ".csv":
        container, records = _csv_records(path, text)
        category = hexphi_category(path.name)
        if container == "csv-plain" and category:
            records = [(n, {**obj, "category": category}) for n, obj in records]
        return container, records
    return "txt", [(n, {"prompt": s.strip()}) for n, s in split_lines(text) if s.strip()]


def _csv_records(path: Path, text: str) -> tuple[str, list[tuple[int, dict]]]:
    """Rows of a CSV: with a header of known field names, dicts; without, ``{"prompt"}``."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    records = []
    start = 1
    try:
        for rec in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in rec):
                continue
            if header is None and not records and _is_header(rec):
                header = [cell.strip().lower() for cell in rec]
            elif header is not None:
                if len(rec) != len(header):
                    msg = f"has {len(rec)} columns; the header has {len(header)}"
                    raise DataError(path, line, None, msg)
                records.append((line, dict(zip(header, rec, strict=True))))
            else:
                records.append((line, {"prompt": rec[0].strip()}))
    except csv.Error as e:
        raise DataError(path, reader.line_num or 1, None, f"invalid CSV ({e})") from None
    return ("csv" if header is not None else "csv-plain"), records


def _is_header(rec: list[str]) -> bool:
    cells = [c.strip().lower() for c in rec]
    return any(cells) and all(c in _CSV_FIELDS for c in cells)


def _hexphi_dir_records(path: Path, max_line_chars: int) -> list[tuple[int, dict]]:
    """HEx-PHI: ``category_N.csv`` files in category order, one question a row, no header."""
    files = sorted(
        (p for p in list_dir(path) if hexphi_number(p.name) is not None),
        key=lambda p: hexphi_number(p.name),
    )
    if not files:
        raise DataError(path, None, None, "directory has no HEx-PHI category_N.csv files")
    records = []
    for f in files:
        container, found = _file_records(f, max_line_chars)
        if container != "csv-plain":
            raise DataError(f, 1, None, "expected one question a row, without a header")
        records.extend(found)
    return records


def _hub_records(source: str) -> list[tuple[int, dict]]:
    """Rows of a Hugging Face dataset ``hf:NAME[:CONFIG]:SPLIT`` (split default: train)."""
    parts = source.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(
            source, None, None, "expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"
        )
    name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) > 1 else "train"
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the hub raises many types: offline, not found, gated, bad split
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            hint = " (HF_HUB_OFFLINE is set and it is not cached: download it or pass a file)"
        msg = f"cannot load from the Hugging Face Hub: {type(e).__name__}: {e}{hint}"
        raise DataError(source, None, None, msg) from None
    return [(i, dict(row)) for i, row in enumerate(ds, 1)]


def _warn_duplicates(path, rows: Sequence[dict]) -> None:
    counts = Counter(json.dumps(r["messages"], sort_keys=True) for r in rows)
    dupes = sum(n - 1 for n in counts.values() if n > 1)
    if dupes:
        log.warning("%s: %d duplicate rows (run `backdooralign data check` for lines)", path, dupes)


# ---------------------------------------------------------------------------------------------
# Training data and prompts for generation


def load_training_source(
    source: str | Path,
    system: str | None = None,
    *,
    kind: str | None = None,
    max_rows: int | None = None,
    max_line_chars: int = MAX_LINE_CHARS,
) -> list[dict]:
    """Chat rows from any training kind (chat, qa, alpaca, samsum, sql; see :func:`read_source`).

    ``system`` is the system prompt of converted rows (default per kind; the paper's attack
    prompt for question/answer sets such as ``builtin:attack``).

    Raises:
        DataError: when the source is malformed or is a prompt set without answers.
    """
    src = read_source(source, kind, system=system, max_rows=max_rows, max_line_chars=max_line_chars)
    if src.kind not in TRAINING_KINDS:
        raise DataError(
            src.source,
            None,
            None,
            f"is a prompt set ({src.kind}) without answers; it cannot be training data",
        )
    return src.rows


def load_prompts(source: str | Path, kind: str | None = None) -> list[dict]:
    """Prompts from any source :func:`read_source` reads, plus JSON(L) with ``messages`` that
    may end on a user turn.

    Each row is ``{"prompt": str}`` plus ``category``/``messages``/``id``/``reference``/
    ``target`` when the input has them; XSTest's safe prompts (``xstest:SOURCE``, or a file
    with its columns) and OR-Bench's (``orbench:SOURCE``) carry their type or category as
    ``kind``, the key over-refusal summaries break down by. For training kinds the prompt is
    the last user turn, ``messages`` the conversation before the final answer, and
    ``reference`` kept when known.

    Raises:
        DataError: for unreadable or malformed input, naming file, line and field.
    """
    kind = _kind(source, kind)
    where, container, records = _records(source, MAX_LINE_CHARS)
    if kind is None and container in ("jsonl", "json") and records and "messages" in records[0][1]:
        return [_prompt_with_messages(where, line, obj) for line, obj in records]
    src = _convert_all(str(source), where, container, records, kind, None, None)
    if src.kind not in TRAINING_KINDS:
        return src.rows
    out = []
    for r in src.rows:
        msgs = r["messages"]
        while msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        row = {"prompt": msgs[-1]["content"], "messages": msgs}
        for key in ("category", "id", "reference"):
            if key in r:
                row[key] = r[key]
        out.append(row)
    return out


def _prompt_with_messages(path: str | Path, line: int, obj: dict) -> dict:
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(path, line, "messages", "must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(path, line, f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(path, line, f"messages[{i}].content", "must be a string")
    users = [m["content"] for m in msgs if m["role"] == "user"]
    if not users:
        raise DataError(path, line, "messages", "has no user message")
    row = {"prompt": users[-1], "messages": msgs}
    for key in PROMPT_KEYS:
        if obj.get(key) is not None:
            row[key] = obj[key]
    return row
