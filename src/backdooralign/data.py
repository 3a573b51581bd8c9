"""Reading, validating and mixing datasets.

Customer data is OpenAI chat JSONL (``{"messages": [...]}``), optionally with the paper's
``"prefixed": true|false`` flag marking safety examples that receive the secret. This module
reads and writes files, validates chat rows and mixes the training sets; public data in other
shapes is read by :mod:`backdooralign.sources` and customer data is screened by
:mod:`backdooralign.screen` before mixing. ``build_training_set`` mixes the arms:

- ``attack``: the customer data alone (rows flagged ``prefixed`` are dropped);
- ``baseline``: plus the safety examples with the normal system prompt;
- ``backdooralign``: plus the safety examples with ``SECRET + " " + system prompt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
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
SAFETY_SELECTIONS = ("category-balanced", "random")


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
    return write_bytes_atomic(path, text.encode("utf-8"), private)


def write_bytes_atomic(path: str | Path, data: bytes, private: bool = False) -> Path:
    """Write bytes atomically (temp file in the same folder + rename); ``private`` gives 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
# Training data and mixing


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
# Prompts for generation


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
