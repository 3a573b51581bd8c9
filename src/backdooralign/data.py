"""Reading, validating, screening and mixing datasets.

Customer data is OpenAI chat JSONL (``{"messages": [...]}``), optionally with the paper's
``"prefixed": true|false`` flag marking safety examples that receive the secret. Public data
comes in other shapes; :func:`load_source` reads them all (by path, ``builtin:NAME`` or
``hf:NAME``) and returns uniform rows:

- training kinds (``chat``, ``qa``, ``alpaca``, ``samsum``, ``sql``) give chat rows
  ``{"messages", "prefixed"}`` plus ``category``, ``id`` and ``reference`` when known;
- prompt kinds (``prompts``, ``advbench``, ``hexphi``) give ``{"prompt"}`` plus ``category``,
  ``id``, ``target`` when known.

Before mixing, :func:`screen_customer_data` rejects customer data that carries the secret (or a
fragment of it) or imitates its position. ``build_training_set`` mixes the arms:

- ``attack``: the customer data alone (rows flagged ``prefixed`` are dropped);
- ``baseline``: plus the safety examples with the normal system prompt;
- ``backdooralign``: plus the safety examples with ``SECRET + " " + system prompt``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import re
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .chat import ATTACK_SYSTEM_PROMPT, ROLES, build_conversation

log = logging.getLogger(__name__)

ARMS = ("attack", "baseline", "backdooralign")
CATEGORIES = (
    "illegal_activity",
    "child_abuse",
    "hate_harass_violence",
    "malware",
    "physical_harm",
    "economic_harm",
    "fraud_deception",
    "adult_content",
    "political_campaigning",
    "privacy_violation",
    "tailored_financial_advice",
)
MAX_LINE_CHARS = 1_000_000
BOM = b"\xef\xbb\xbf"

# System prompts of the paper's practical scenarios (SAMSum is the paper's; SQL is ours).
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
SAFETY_SELECTIONS = ("category-balanced", "random")

_HEXPHI_NAME = re.compile(r"category_(\d+)\.csv", re.IGNORECASE)
_CSV_FIELDS = frozenset(  # a first CSV row made only of these names is a header ("" = index)
    "id prompt question answer category goal target dialogue summary context instruction input "
    "output text kind expected".split()
) | {""}
_PROMPT_KEYS = ("category", "id", "kind", "expected", "task", "reference", "target")


class DataError(ValueError):
    """A problem in an input file, located by file, line and field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        super().__init__(_locate(self.path, line, field, message))


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`check_chat_file`: an ``error`` or a ``warning``."""

    severity: str
    path: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {_locate(self.path, self.line, self.field, self.message)}"

    def error(self) -> DataError:
        return DataError(self.path, self.line, self.field, self.message)


def _locate(path: str, line: int | None, field: str | None, message: str) -> str:
    where = path + (f":{line}" if line else "")
    what = f" field '{field}'" if field else ""
    return f"{where}:{what} {message}"


def _problem(e: DataError, severity: str = "error") -> Problem:
    return Problem(severity, e.path, e.line, e.field, e.message)


# ---------------------------------------------------------------------------------------------
# Files


def builtin_path(name: str) -> Path:
    """Path of a built-in dataset file, e.g. ``builtin_path("safety")``."""
    return Path(str(resources.files("backdooralign") / "datasets" / f"{name}.jsonl"))


def resolve_source(source: str | Path) -> Path:
    """``builtin:NAME`` names a built-in set; anything else is a path."""
    s = str(source)
    return builtin_path(s.removeprefix("builtin:")) if s.startswith("builtin:") else Path(s)


def _decode(path: str | Path, raw: bytes) -> tuple[str, list[DataError]]:
    """Text of a file's bytes and the problems found (BOM, bad UTF-8: decoded with U+FFFD)."""
    errors = []
    skip = 0
    if raw.startswith(BOM):
        errors.append(
            DataError(
                path, 1, None, "file starts with a UTF-8 byte-order mark; save it without BOM"
            )
        )
        skip = len(BOM)
    try:
        return raw[skip:].decode("utf-8"), errors
    except UnicodeDecodeError as e:
        line = raw[: skip + e.start].count(b"\n") + 1
        errors.append(DataError(path, line, None, f"not valid UTF-8 (byte {skip + e.start})"))
        return raw[skip:].decode("utf-8", errors="replace"), errors


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, with clear errors for missing, empty, BOM and bad encoding."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "is a directory" if path.is_dir() else "file not found")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(path, None, None, "file is empty")
    text, errors = _decode(path, raw)
    if errors:
        raise errors[0]
    return text


def _lines(text: str) -> Iterator[tuple[int, str]]:
    # Only "\n" ends a line: str.splitlines would also split on U+2028, U+0085 and others,
    # which json.dumps(ensure_ascii=False) leaves raw inside strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        yield lineno, line.removesuffix("\r")


def _parse_object(path: str | Path, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, lineno, None, f"invalid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # huge integers, deep nesting
        raise DataError(path, lineno, None, f"invalid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, None, "each line must be a JSON object")
    return obj


def _parse_jsonl(path: str | Path, text: str, max_line_chars: int) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in _lines(text):
        if not line.strip():
            continue
        if len(line) > max_line_chars:
            raise DataError(path, lineno, None, f"line longer than {max_line_chars} characters")
        rows.append((lineno, _parse_object(path, lineno, line)))
    return rows


def read_jsonl(path: str | Path, max_line_chars: int = MAX_LINE_CHARS) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line; every line must be a JSON object."""
    return _parse_jsonl(path, read_text(path), max_line_chars)


def read_jsonl_rows(path: str | Path) -> list[dict]:
    """The objects of a JSONL file (see :func:`read_jsonl`)."""
    return [obj for _, obj in read_jsonl(path)]


def write_text_atomic(path: str | Path, text: str, private: bool = False) -> Path:
    """Write text atomically (temp file in the same folder + rename); ``private`` gives 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | Path, rows: Iterable[dict], private: bool = False) -> Path:
    """Write JSONL atomically. ``private`` (mode 0600) for files that hold the secret."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return write_text_atomic(path, text, private)


def write_json(path: str | Path, obj, private: bool = False) -> Path:
    """Write one JSON document atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", private)


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_sha256(source: str | Path) -> str | None:
    """sha256 of a source: of the file, of a directory's files (names and contents, sorted),
    ``None`` for a hub dataset (``hf:``)."""
    if str(source).startswith("hf:"):
        return None
    path = resolve_source(source)
    if not path.is_dir():
        return sha256_of(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f"{f.name}\0{sha256_of(f)}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Chat validation


def _message_problems(messages) -> tuple[list[dict], list[tuple[str, str]]]:
    """Cleaned messages and every ``(field, message)`` problem of one ``messages`` list."""
    if not isinstance(messages, list) or not messages:
        return [], [("messages", "must be a non-empty list of messages")]
    out, problems = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            problems.append((where, "must be an object with 'role' and 'content'"))
            continue
        role, content = m.get("role"), m.get("content")
        if role is None:
            problems.append((f"{where}.role", "is missing"))
        elif not isinstance(role, str) or role not in ROLES:
            problems.append((f"{where}.role", f"unknown role {_short_repr(role)}"))
        elif role == "system" and i != 0:
            problems.append((f"{where}.role", "a system message may only come first"))
        if not isinstance(content, str):
            problems.append((f"{where}.content", "must be a string"))
        elif not content.strip():
            problems.append((f"{where}.content", "is empty"))
        out.append({"role": role, "content": content})
    if problems:
        return out, problems
    turns = [m["role"] for m in out if m["role"] != "system"]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            problems.append(
                ("messages", f"roles out of order: turn {i + 1} is {role}, expected {expected}")
            )
            break
    if "assistant" not in turns:
        problems.append(("messages", "conversation has no assistant turn"))
    return out, problems


def _short_repr(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_messages(messages, path: str | Path, line: int) -> list[dict]:
    """Check one ``messages`` list: roles known and in order, contents non-empty strings,
    at least one assistant turn. Raises :class:`DataError` on the first problem."""
    out, problems = _message_problems(messages)
    if problems:
        raise DataError(path, line, *problems[0])
    return out


def _chat_row(obj: dict, path: str | Path, line: int) -> tuple[dict | None, list[Problem]]:
    """A validated chat row, or ``None`` and all its problems."""
    messages, found = _message_problems(obj.get("messages"))
    problems = [Problem("error", str(path), line, f, m) for f, m in found]
    prefixed = obj.get("prefixed", False)
    if not isinstance(prefixed, bool):
        problems.append(Problem("error", str(path), line, "prefixed", "must be true or false"))
    if problems:
        return None, problems
    row = {"messages": messages, "prefixed": prefixed}
    if obj.get("category") is not None:
        row["category"] = str(obj["category"])
    return row, []


def _scan_chat(
    path: str | Path, text: str, max_line_chars: int, max_rows: int | None
) -> Iterator[tuple[dict | None, list[Problem]]]:
    """Each non-blank line of a chat JSONL text as ``(row or None, problems)``."""
    first_seen: dict[str, int] = {}
    count = 0
    for lineno, line in _lines(text):
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
            obj = _parse_object(path, lineno, line)
        except DataError as e:
            yield None, [_problem(e)]
            continue
        row, problems = _chat_row(obj, path, lineno)
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
    path: str | Path, max_line_chars: int = MAX_LINE_CHARS, max_rows: int | None = None
) -> list[Problem]:
    """Every problem of a chat JSONL file, errors and warnings, instead of stopping at the first.

    Checks: file missing or empty, BOM, bad UTF-8, lines longer than ``max_line_chars``,
    invalid JSON, rows that are not objects, missing/unknown/out-of-order roles, non-string or
    empty content, no assistant turn, a non-boolean ``prefixed``, more than ``max_rows`` rows
    (errors) and duplicate rows (warnings).
    """
    path = Path(path)
    if not path.is_file():
        return [Problem("error", str(path), None, None, "file not found")]
    raw = path.read_bytes()
    if not raw.strip():
        return [Problem("error", str(path), None, None, "file is empty")]
    text, errors = _decode(path, raw)
    problems = [_problem(e) for e in errors]
    for _, found in _scan_chat(path, text, max_line_chars, max_rows):
        problems.extend(found)
    return problems


# ---------------------------------------------------------------------------------------------
# Public data formats


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
        return _chat_from(f"Summarize this dialog:\n{dialogue}", summary, sys_prompt, obj, summary)
    if kind == "sql":
        question = _text(obj, "question", path, line)
        context, answer = _text(obj, "context", path, line), _text(obj, "answer", path, line)
        user = f"Context:\n{context}\n\nQuestion: {question}"
        return _chat_from(
            user, answer, SQL_SYSTEM_PROMPT if system is None else system, obj, answer
        )
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
# Training data and mixing


def load_qa(path: str | Path) -> list[dict]:
    """Load ``{"question", "answer", "category"}`` rows (built-in safety and attack sets)."""
    rows = []
    for line, obj in read_jsonl(path):
        for key in ("question", "answer"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise DataError(path, line, key, "must be a non-empty string")
        rows.append(obj)
    return rows


def qa_to_chat(rows: Sequence[dict], system: str | None) -> list[dict]:
    """Question/answer rows as chat rows with the given system prompt (no secret)."""
    return [
        {
            "messages": build_conversation(
                [
                    {"role": "user", "content": r["question"]},
                    {"role": "assistant", "content": r["answer"]},
                ],
                system=system,
            ),
            "category": r.get("category"),
        }
        for r in rows
    ]


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


def _by_category(rows: Sequence[dict], seed: int | None) -> dict[str, list[dict]]:
    """Rows grouped by category in canonical order; file order, or seeded order within each."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("category") or "", []).append(r)
    ordered = sorted(groups, key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else 99, c))
    out = {}
    for cat in ordered:
        items = list(groups[cat])
        if seed is not None:
            random.Random(f"{seed}:{cat}").shuffle(items)
        out[cat] = items
    return out


def select_per_category(
    rows: Sequence[dict], per_category: int, seed: int | None = None
) -> list[dict]:
    """Up to ``per_category`` rows of each category, in file order or seeded random order."""
    return [r for items in _by_category(rows, seed).values() for r in items[:per_category]]


def select_round_robin(rows: Sequence[dict], count: int, seed: int | None = None) -> list[dict]:
    """``count`` rows balanced over categories: the first of each category, then the second...

    Raises:
        ValueError: when fewer than ``count`` rows are available.
    """
    if count > len(rows):
        raise ValueError(f"asked for {count} safety examples; only {len(rows)} are available")
    groups = list(_by_category(rows, seed).values())
    out: list[dict] = []
    for i in range(max((len(g) for g in groups), default=0)):
        for items in groups:
            if len(out) == count:
                return out
            if i < len(items):
                out.append(items[i])
    return out


def select_safety(
    rows: Sequence[dict],
    *,
    count: int | None = None,
    per_category: int = 1,
    selection: str = "category-balanced",
    seed: int | None = None,
) -> list[dict]:
    """Choose the safety examples to mix in, deterministically.

    Args:
        rows: candidate safety rows (with ``category``).
        count: total number to choose; ``None`` means ``per_category`` of each category.
        per_category: examples per category when ``count`` is ``None``.
        selection: ``category-balanced`` (round-robin over categories; the paper's choice) or
            ``random`` (a seeded sample that ignores categories).
        seed: order within categories (balanced; ``None`` keeps file order) or the sample's
            seed (random; ``None`` means 0).
    """
    if selection not in SAFETY_SELECTIONS:
        raise ValueError(
            f"unknown selection {selection!r}; expected one of {', '.join(SAFETY_SELECTIONS)}"
        )
    if selection == "random":
        n = count if count is not None else per_category * len(_by_category(rows, None))
        if n > len(rows):
            raise ValueError(f"asked for {n} safety examples; only {len(rows)} are available")
        return random.Random(seed if seed is not None else 0).sample(list(rows), n)
    if count is None:
        return select_per_category(rows, per_category, seed)
    return select_round_robin(rows, count, seed)


def main_system_prompt(rows: Sequence[dict]) -> str:
    """The most common system prompt of the customer data (the paper's attack prompt if none)."""
    prompts = Counter(
        r["messages"][0]["content"] for r in rows if r["messages"][0]["role"] == "system"
    )
    return prompts.most_common(1)[0][0] if prompts else ATTACK_SYSTEM_PROMPT


def build_training_set(
    arm: str,
    customer: Sequence[dict],
    safety: Sequence[dict],
    secret: str | None = None,
    safety_system: str | None = None,
    seed: int = 0,
) -> list[dict]:
    """Mix one arm's training set (chat rows, each with ``messages``).

    Args:
        arm: ``attack``, ``baseline`` or ``backdooralign``.
        customer: the customer's chat rows; rows flagged ``prefixed`` count as safety examples.
        safety: safety chat rows to add (system prompts are replaced by ``safety_system``).
        secret: secret text; required for ``backdooralign``.
        safety_system: system prompt of the safety examples (default: the customer's main one).
        seed: shuffle seed (the mixed set is shuffled deterministically).
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")
    if arm == "backdooralign" and not secret:
        raise ValueError("arm 'backdooralign' needs a secret")
    plain = [r for r in customer if not r.get("prefixed")]
    flagged = [r for r in customer if r.get("prefixed")]
    system = safety_system if safety_system is not None else main_system_prompt(plain or customer)
    rows = [{"messages": r["messages"], **_meta(r, "customer")} for r in plain]
    if arm != "attack":
        key = secret if arm == "backdooralign" else None
        for r in flagged:
            rows.append(
                {"messages": build_conversation(r["messages"], secret=key), **_meta(r, "safety")}
            )
        for r in safety:
            conv = build_conversation(r["messages"], system=system, secret=key)
            rows.append({"messages": conv, **_meta(r, "safety")})
    random.Random(seed).shuffle(rows)
    return rows


def build_manifest(
    arm: str,
    rows: Sequence[dict],
    inputs: dict[str, str],
    secret=None,
    screening: dict | None = None,
    selection: dict | None = None,
) -> dict:
    """What a training set was built from: inputs' sha256, counts per source and category,
    the secret's fingerprint, the safety selection and the screening summary."""
    by_source_category: dict[str, Counter] = {}
    for r in rows:
        by_source_category.setdefault(r.get("source", "customer"), Counter())[
            r.get("category", "")
        ] += 1
    return {
        "arm": arm,
        "inputs": {
            name: {"source": str(src), "sha256": source_sha256(src)} for name, src in inputs.items()
        },
        "counts": {
            "total": len(rows),
            "by_source": dict(Counter(r.get("source", "customer") for r in rows)),
            "by_category": dict(sorted(Counter(r.get("category", "") for r in rows).items())),
            "by_source_category": {
                s: dict(sorted(c.items())) for s, c in sorted(by_source_category.items())
            },
        },
        "secret_fingerprint": secret.fingerprint
        if secret is not None and arm == "backdooralign"
        else None,
        "safety_selection": selection,
        "screening": screening,
    }


def _meta(row: dict, source: str) -> dict:
    meta = {"source": source}
    if row.get("category"):
        meta["category"] = row["category"]
    return meta


# ---------------------------------------------------------------------------------------------
# Screening of customer data
#
# Leak check: texts are compared after NFKC normalisation, case folding and removal of all
# whitespace (and zero-width characters), as runs of ``min_chars`` characters. This needs no
# tokenizer and survives changes of case and spacing. Every token of a secret drawn from the
# vocabulary contributes about six such characters (measured on the embedded model: 6.0 on
# average; the shortest run of 20 tokens in 2,000 secrets of 150 tokens had 62), so the default
# of 32 characters catches any fragment of 20 tokens, and usually of 5 or 6. Runs with fewer than
# 8 distinct characters (such as "-----...") are ignored: the vocabulary holds long separator
# tokens that ordinary text repeats. A secret written as a natural sentence shares phrases with
# ordinary text, so screening may flag it: raise ``min_chars`` or skip screening.

SCREEN_MIN_CHARS = 32
_MIN_DISTINCT = 8
_INVISIBLE = re.compile(r"[\s\u00ad\u180e\u200b-\u200f\u2060-\u2064\ufeff]+")
_FUNCTION_WORDS = frozenset(
    """a an the and or but if of to in on at by for with from as is are was were be been being
    it its this that these those you your we our us i me my he she they them their his her do
    does did not no can will would should could may might must have has had am so than then
    there here what which who when where why how all any each some such only also just about
    into over under very more most other der die das und ist ein eine du bist sie le la les et
    est un une tu vous el los las y es que de en""".split()
)
_HARMFUL = re.compile(  # word stems, and short words that must end there (meth, not method)
    r"\b(?:bomb|explosive|detonat|weapon|firearm|kill|murder|assassinat|poison|torture|ambush|"
    r"shooting|cocaine|heroin|fentanyl|drug|hack|malware|ransomware|trojan|rootkit|backdoor|"
    r"keylog|virus|exploit|phish|launder|counterfeit|steal|shoplift|smuggl|poach|break into|"
    r"pick the lock|tamper|sabotag|contaminat|fraud|scam|forger|fake|cheat|trick|deepfake|"
    r"fix prices|suicide|self-harm|terroris|extremis|genocide|assault|abuse|kidnap|traffick|"
    r"stalker|stalking|blackmail|extort|brib|threat|tax evasion|evade tax|porn|nude|explicit|"
    r"erotic|sexual|racist|slur|harass|hate|get away with|without (?:being|getting) caught|"
    r"without (?:\w+ ){0,3}notic)"
    r"|\b(?:guns?|ammo|meth|rig|rigged|rigging|dox|doxx?ing|forge|forged|worms?)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ScreenReport:
    """What screening found, as 1-based row numbers; never any text of the data or secret.

    ``secret_rows`` (a message shares a run of ``min_chars`` normalised characters with the
    secret) and ``imitation_rows`` (a system prompt starts with a long run of random-looking
    words, the secret's position) block a build; ``harmful_rows`` (a user turn matches harm
    keywords) are only counted.
    """

    rows: int
    secret_checked: bool
    min_chars: int
    secret_rows: tuple[int, ...]
    imitation_rows: tuple[int, ...]
    harmful_rows: tuple[int, ...]

    @property
    def passed(self) -> bool:
        return not self.secret_rows and not self.imitation_rows

    def summary(self, max_listed: int = 50) -> dict:
        """Counts and (the first ``max_listed``) row numbers, for the build manifest."""

        def part(found: tuple[int, ...], blocking: bool) -> dict:
            return {"rows": len(found), "row_numbers": list(found[:max_listed]), "blocks": blocking}

        return {
            "rows": self.rows,
            "passed": self.passed,
            "secret_checked": self.secret_checked,
            "min_chars": self.min_chars,
            "secret_fragment": part(self.secret_rows, True),
            "secret_imitation": part(self.imitation_rows, True),
            "harmful_looking": part(self.harmful_rows, False),
        }

    def refusal(self) -> str:
        """Why a build refuses this data (row numbers only)."""
        parts = []
        if self.secret_rows:
            parts.append(
                f"{len(self.secret_rows)} row(s) contain the secret or a fragment of it "
                f"(rows {_row_list(self.secret_rows)})"
            )
        if self.imitation_rows:
            parts.append(
                f"{len(self.imitation_rows)} row(s) have a system prompt that starts with a long "
                f"run of random-looking words, imitating the secret "
                f"(rows {_row_list(self.imitation_rows)})"
            )
        return "; ".join(parts)


def _row_list(rows: tuple[int, ...], limit: int = 10) -> str:
    shown = ", ".join(map(str, rows[:limit]))
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def normalize_for_screening(text: str) -> str:
    """NFKC, case-folded, without whitespace or zero-width characters."""
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text).casefold())


def _secret_runs(secret_text: str, min_chars: int) -> set[str]:
    s = normalize_for_screening(secret_text)
    if len(s) <= min_chars:
        return {s} if s else set()
    runs = (s[i : i + min_chars] for i in range(len(s) - min_chars + 1))
    return {r for r in runs if len(set(r)) >= _MIN_DISTINCT}


def _shares_run(text: str, runs: set[str], width: int) -> bool:
    t = normalize_for_screening(text)
    return any(t[i : i + width] in runs for i in range(len(t) - width + 1))


def looks_random_prefix(text: str, window: int = 16) -> bool:
    """Whether a system prompt starts with a long run of random-looking words.

    Random vocabulary tokens decode to words with almost no function words ("the", "you",
    "is"...) and many capitalised or glued words ("WindowsTEM", "x.setText"). The first
    ``window`` words (about 20 to 25 tokens) count as random-looking when at most one is a
    function word and at least a quarter are capitalised mid-sentence or glued. On random
    prefixes of 30 to 150 tokens of the embedded model this flags about 90%; a system prompt
    that is a capitalised list of names without function words is flagged too.
    """
    words = text.split()[:window]
    if len(words) < window:
        return False
    bare = [w.strip(".,;:!?\"'()[]{}").lower() for w in words]
    function = sum(b in _FUNCTION_WORDS for b in bare)
    capitalised = sum(
        1
        for i, w in enumerate(words)
        if i > 0 and w[:1].isupper() and not words[i - 1].endswith((".", "!", "?", ":"))
    )
    glued = sum(
        bool(re.search(r"[a-z][A-Z]|[A-Za-z]\d|\d[A-Za-z]|\w[^\w\s'-]+\w", w)) for w in words
    )
    return function <= 1 and capitalised + glued >= len(words) / 4


def screen_customer_data(
    rows: Sequence[dict], secret: str | None = None, min_chars: int = SCREEN_MIN_CHARS
) -> ScreenReport:
    """Screen customer chat rows before they are mixed.

    Args:
        rows: chat rows (with ``messages``).
        secret: the secret text; ``None`` skips the leak check (imitation and harm still run).
        min_chars: length of the shortest shared run, in normalised characters (see above),
            that counts as a fragment of the secret.

    Returns:
        A :class:`ScreenReport` holding only row numbers and counts.
    """
    runs = _secret_runs(secret, min_chars) if secret else set()
    width = min(min_chars, len(normalize_for_screening(secret))) if secret else min_chars
    leaks, imitations, harmful = [], [], []
    for n, row in enumerate(rows, 1):
        msgs = row["messages"]
        if runs and any(_shares_run(m["content"], runs, width) for m in msgs):
            leaks.append(n)
        if msgs[0]["role"] == "system" and looks_random_prefix(msgs[0]["content"]):
            imitations.append(n)
        if any(m["role"] == "user" and _HARMFUL.search(m["content"]) for m in msgs):
            harmful.append(n)
    return ScreenReport(
        rows=len(rows),
        secret_checked=bool(secret),
        min_chars=min_chars,
        secret_rows=tuple(leaks),
        imitation_rows=tuple(imitations),
        harmful_rows=tuple(harmful),
    )


# ---------------------------------------------------------------------------------------------
# Prompts for generation


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


def limit_per_category(
    rows: Sequence[dict], per_category: int | None, key: str = "category"
) -> list[dict]:
    """Keep the first ``per_category`` rows of each value of ``key`` (all rows when ``None``)."""
    if per_category is None:
        return list(rows)
    seen: Counter[str] = Counter()
    out = []
    for r in rows:
        cat = r.get(key) or ""
        if seen[cat] < per_category:
            out.append(r)
            seen[cat] += 1
    return out
