"""Public dataset formats, read into uniform rows.

:func:`load_source` reads them all (by path, ``builtin:NAME`` or ``hf:NAME``): chat JSONL,
question/answer sets, Alpaca, SAMSum, sql-create-context, AdvBench, HEx-PHI and plain prompt
lists (JSONL, JSON, CSV such as the 275-question set, or TXT), and returns uniform rows:

- training kinds (``chat``, ``qa``, ``alpaca``, ``samsum``, ``sql``) give chat rows
  ``{"messages", "prefixed"}`` plus ``category``, ``id`` and ``reference`` when known;
- prompt kinds (``prompts``, ``advbench``, ``hexphi``) give ``{"prompt"}`` plus ``category``,
  ``id``, ``target`` when known.

:func:`load_training_source` keeps the training kinds; :func:`load_prompts` turns any of them
into prompts for generation.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .chat import ATTACK_SYSTEM_PROMPT, build_conversation
from .data import (
    CATEGORIES,
    MAX_LINE_CHARS,
    DataError,
    _chat_row,
    _lines,
    _parse_jsonl,
    read_jsonl,
    read_text,
    resolve_source,
)

log = logging.getLogger(__name__)

# System prompts and user turns of the paper's practical scenarios (SAMSum's system prompt is the
# paper's; the SQL one is ours). Training conversions and evaluation prompts (tasks.py) share them.
SAMSUM_SYSTEM_PROMPT = "You are a helpful assistant for dialog summarization."
SQL_SYSTEM_PROMPT = (
    "You are a helpful assistant for writing SQL queries. "
    "Answer the question with one SQL query over the tables in the context."
)

KINDS = ("chat", "qa", "alpaca", "samsum", "sql", "prompts", "advbench", "hexphi")
TRAINING_KINDS = ("chat", "qa", "alpaca", "samsum", "sql")
KIND_HELP = {
    "chat": "chat JSONL: messages (+ prefixed, category)",
    "qa": "question/answer rows (built-in safety and attack sets)",
    "alpaca": "Alpaca instruction/input/output",
    "samsum": "SAMSum dialogue/summary (summary kept as reference)",
    "sql": "sql-create-context question/context/answer (answer kept as reference)",
    "prompts": "prompts: JSONL prompt rows, or CSV/TXT with one question a row",
    "advbench": "AdvBench harmful_behaviors: goal (prompt) and target",
    "hexphi": "HEx-PHI: category_N.csv files, one question a row, category from the name",
}

_HEXPHI_NAME = re.compile(r"category_(\d+)\.csv", re.IGNORECASE)
_CSV_FIELDS = frozenset(  # a first CSV row made only of these names is a header ("" = index)
    "id prompt question answer category goal target dialogue summary context instruction input "
    "output text kind expected".split()
) | {""}
_PROMPT_KEYS = ("category", "id", "kind", "expected", "task", "reference", "target")


def samsum_prompt(dialogue: str) -> str:
    """The SAMSum user turn."""
    return f"Summarize this dialog:\n{dialogue}"


def sql_prompt(question: str, context: str) -> str:
    """The sql-create-context user turn: schema (``CREATE TABLE ...``) and question."""
    return f"Context:\n{context}\n\nQuestion: {question}"


@dataclass(frozen=True)
class Source:
    """A loaded dataset: where it came from, its detected kind, its input fields, its rows."""

    source: str
    kind: str
    fields: tuple[str, ...]
    rows: list[dict]


def load_source(
    source: str | Path,
    kind: str | None = None,
    *,
    system: str | None = None,
    max_rows: int | None = None,
    max_line_chars: int = MAX_LINE_CHARS,
) -> list[dict]:
    """Rows of a dataset in any supported format, as uniform dicts (see the module docstring).

    Args:
        source: a path (``.jsonl``, ``.json``, ``.csv``, ``.txt``, or a directory of HEx-PHI
            ``category_N.csv`` files), ``builtin:NAME``, or a Hugging Face dataset
            ``hf:NAME``, ``hf:NAME:SPLIT``, ``hf:NAME:CONFIG:SPLIT`` (needs the network or the
            local cache).
        kind: one of :data:`KINDS`; ``None`` detects it from the suffix, a CSV header, the
            fields of the first row, or a ``category_N.csv`` file name.
        system: system prompt for converted training kinds (default: ``ATTACK_SYSTEM_PROMPT``
            for ``qa``, :data:`SAMSUM_SYSTEM_PROMPT`, :data:`SQL_SYSTEM_PROMPT`, none for
            ``alpaca``; ``""`` for none). Chat rows keep their own.
        max_rows: the most rows accepted (``None``: no cap).
        max_line_chars: the longest line accepted, in characters.

    Raises:
        DataError: for unreadable or malformed input, naming file, line and field.
    """
    return read_source(
        source, kind, system=system, max_rows=max_rows, max_line_chars=max_line_chars
    ).rows


def read_source(
    source: str | Path,
    kind: str | None = None,
    *,
    system: str | None = None,
    max_rows: int | None = None,
    max_line_chars: int = MAX_LINE_CHARS,
) -> Source:
    """Like :func:`load_source`, but also returns the detected kind and the input fields."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    name = str(source)
    if name.startswith("hf:"):
        where, container, records = name, "hub", _hub_records(name)
    else:
        where = resolve_source(source)
        if where.is_dir():
            container, records = "dir", _hexphi_dir_records(where, max_line_chars)
        else:
            container, records = _file_records(where, max_line_chars)
    if not records:
        raise DataError(where, None, None, "no rows")
    first_line, first = records[0]
    kind = kind or _detect_kind(container, first, where, first_line)
    fields = tuple(dict.fromkeys(k for _, obj in records[:100] for k in obj))
    rows = []
    for line, obj in records:
        if max_rows is not None and len(rows) >= max_rows:
            raise DataError(where, line, None, f"more than {max_rows} rows (the configured cap)")
        rows.append(_convert(kind, obj, where, line, system))
    if kind in TRAINING_KINDS:
        _warn_duplicates(where, rows)
    return Source(name, kind, fields, rows)


def _file_records(path: Path, max_line_chars: int) -> tuple[str, list[tuple[int, dict]]]:
    """``(container, [(line, object)])`` of one file; plain text rows become ``{"prompt"}``."""
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl", _parse_jsonl(path, text, max_line_chars)
    if suffix not in (".json", ".csv", ".txt", ""):
        raise DataError(
            path,
            None,
            None,
            f"unsupported file type {suffix!r} (jsonl, json, csv, txt, or a "
            "directory of category_N.csv files)",
        )
    for lineno, line in _lines(text):
        if len(line) > max_line_chars:
            raise DataError(path, lineno, None, f"line longer than {max_line_chars} characters")
    if suffix == ".json":
        if text.lstrip().startswith("["):
            return "json", _json_array_records(path, text)
        return "jsonl", _parse_jsonl(path, text, max_line_chars)  # JSON Lines named .json
    if suffix == ".csv":
        container, records = _csv_records(path, text)
        category = _hexphi_category(path.name)
        if container == "csv-plain" and category:
            records = [(n, {**obj, "category": category}) for n, obj in records]
        return container, records
    return "txt", [(n, {"prompt": s.strip()}) for n, s in _lines(text) if s.strip()]


def _json_array_records(path: Path, text: str) -> list[tuple[int, dict]]:
    """Objects of a JSON array, each with the line it starts on."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"invalid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(path, None, None, f"invalid JSON ({type(e).__name__})") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    records = []
    for item in items:
        start = pos
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", start, pos)
        if not isinstance(item, dict):
            raise DataError(path, line, None, "each item of the JSON array must be an object")
        records.append((line, item))
        _, end = decoder.raw_decode(text, pos)
        line += text.count("\n", pos, end)
        pos = end
    return records


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


def _hexphi_category(name: str) -> str | None:
    m = _HEXPHI_NAME.fullmatch(name)
    if m is None:
        return None
    n = int(m.group(1))
    return CATEGORIES[n - 1] if 1 <= n <= len(CATEGORIES) else f"category_{n}"


def _hexphi_dir_records(path: Path, max_line_chars: int) -> list[tuple[int, dict]]:
    """HEx-PHI: ``category_N.csv`` files in category order, one question a row, no header."""
    files = sorted(
        (p for p in path.iterdir() if _HEXPHI_NAME.fullmatch(p.name)),
        key=lambda p: int(_HEXPHI_NAME.fullmatch(p.name).group(1)),
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


def _detect_kind(container: str, first: dict, path, line: int) -> str:
    """The kind of a source from how it was read and the fields of its first row."""
    if container in ("csv-plain", "txt"):
        return "hexphi" if _hexphi_category(Path(str(path)).name) else "prompts"
    if container == "dir":
        return "hexphi"
    keys = set(first)
    if "messages" in keys:
        return "chat"
    if {"dialogue", "summary"} <= keys:
        return "samsum"
    if {"question", "context", "answer"} <= keys:
        return "sql"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"question", "answer"} <= keys:
        return "qa"
    if "goal" in keys:
        return "advbench"
    if "prompt" in keys:
        return "prompts"
    shown = ", ".join(sorted(map(str, keys))[:10]) or "none"
    raise DataError(
        path,
        line,
        None,
        f"cannot tell the format from the fields ({shown}); pass a kind ({', '.join(KINDS)})",
    )


def _text(obj: dict, key: str, path, line: int, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(path, line, key, "is missing" if value is None else "must be a string")
    if required and not value.strip():
        raise DataError(path, line, key, "is empty")
    return value


def _chat_from(
    user: str, answer: str, system: str | None, obj: dict, reference: str | None = None
) -> dict:
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    row = {"messages": build_conversation(turns, system=system or None), "prefixed": False}
    for key in ("category", "id"):
        if obj.get(key) is not None:
            row[key] = str(obj[key])
    if reference is not None:
        row["reference"] = reference
    return row


def _convert(kind: str, obj: dict, path, line: int, system: str | None) -> dict:
    """One input object as a uniform row of ``kind``."""
    if kind == "chat":
        row, problems = _chat_row(obj, path, line)
        if problems:
            raise problems[0].error()
        return row
    if kind == "qa":
        q, a = _text(obj, "question", path, line), _text(obj, "answer", path, line)
        return _chat_from(q, a, ATTACK_SYSTEM_PROMPT if system is None else system, obj)
    if kind == "alpaca":
        instruction = _text(obj, "instruction", path, line)
        extra = _text(obj, "input", path, line, required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _chat_from(user, _text(obj, "output", path, line), system, obj)
    if kind == "samsum":
        dialogue, summary = _text(obj, "dialogue", path, line), _text(obj, "summary", path, line)
        sys_prompt = SAMSUM_SYSTEM_PROMPT if system is None else system
        return _chat_from(samsum_prompt(dialogue), summary, sys_prompt, obj, summary)
    if kind == "sql":
        question = _text(obj, "question", path, line)
        context, answer = _text(obj, "context", path, line), _text(obj, "answer", path, line)
        sys_prompt = SQL_SYSTEM_PROMPT if system is None else system
        return _chat_from(sql_prompt(question, context), answer, sys_prompt, obj, answer)
    if kind == "advbench":
        row = {"prompt": _text(obj, "goal", path, line).strip()}
        target = obj.get("target")
        if isinstance(target, str) and target.strip():
            row["target"] = target
        return row
    row = {"prompt": _text(obj, "prompt", path, line).strip()}  # prompts, hexphi
    for key in _PROMPT_KEYS:
        if obj.get(key) is not None:
            row[key] = obj[key]
    return row


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
    """Chat rows from any training kind (chat, qa, alpaca, samsum, sql; see :func:`load_source`).

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


def load_prompts(path: str | Path, kind: str | None = None) -> list[dict]:
    """Prompts from any source :func:`load_source` reads, plus JSONL with ``messages`` that
    may end on a user turn.

    Each row is ``{"prompt": str}`` plus ``category``/``messages``/``id``/``reference``/
    ``target`` when the input has them. For training kinds the prompt is the last user turn,
    ``messages`` the conversation before the final answer, and ``reference`` kept when known.
    """
    file = None if str(path).startswith("hf:") else resolve_source(path)
    if kind is None and file is not None and file.suffix.lower() == ".jsonl":
        records = read_jsonl(file)
        if records and "messages" in records[0][1]:
            return _prompts_with_messages(file, records)
    src = read_source(path, kind)
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


def _prompts_with_messages(path: Path, records: list[tuple[int, dict]]) -> list[dict]:
    rows = []
    for line, obj in records:
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(path, line, "messages", "must be a non-empty list")
        users = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise DataError(path, line, "messages", "has no user message")
        row = {"prompt": users[-1], "messages": msgs}
        for key in _PROMPT_KEYS:
            if obj.get(key) is not None:
                row[key] = obj[key]
        rows.append(row)
    return rows
