"""The shapes of rows: chat rows, and the public dataset formats converted to them.

A chat row is ``{"messages": [...]}`` with an optional ``"prefixed": true|false`` flag (the
paper's marker of safety examples that receive the secret) and an optional ``category``;
:func:`chat_row` validates one. ``prefixed`` is a provider-side field (:data:`PROVIDER_FIELDS`):
it is honoured only in the provider's safety source; customer data never decides which rows
get the secret (the service refuses it in uploads, ``build`` leaves flagged customer rows out).
Each other kind of :data:`KINDS` has its own fields (:data:`KIND_HELP`); :func:`detect_kind`
tells the kind from the fields of a first row and :func:`convert` turns one record into a
uniform row. Errors name file, line and field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..core.chat import ATTACK_SYSTEM_PROMPT, ROLES, build_conversation
from ..files import DataError

# The 11 harm categories of HEx-PHI (category_N.csv is CATEGORIES[N - 1]), in the paper's order.
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

# System prompts and user turns of the paper's practical scenarios (SAMSum's system prompt is the
# paper's; the SQL one is ours). Training conversions and evaluation prompts share them.
SAMSUM_SYSTEM_PROMPT = "You are a helpful assistant for dialog summarization."
SQL_SYSTEM_PROMPT = (
    "You are a helpful assistant for writing SQL queries. "
    "Answer the question with one SQL query over the tables in the context."
)

KINDS = (
    "chat",
    "qa",
    "alpaca",
    "samsum",
    "sql",
    "prompts",
    "advbench",
    "hexphi",
    "xstest",
    "orbench",
)
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
    "xstest": "XSTest (Röttger et al. 2023): prompt, type (+ id, label, focus, note); its safe "
    "prompts only, type kept as kind",
    "orbench": "OR-Bench (Cui et al. 2024): prompt, category (kept as kind); every row is "
    "seemingly toxic but safe",
}
# Over-refusal benchmarks: the field each keeps as ``kind``, the breakdown of refusal summaries.
BENCHMARK_KIND_FIELD = {"xstest": "type", "orbench": "category"}

# Fields only the provider may set: they decide which rows get the secret. A customer's upload
# holding one is refused; flagged rows of customer data are left out of every training set.
PROVIDER_FIELDS = ("prefixed",)
PROVIDER_FIELD_MESSAGE = (
    "is a provider-side field: customer data cannot choose which rows get the provider's secret"
)

# fields a prompt row keeps from its input
PROMPT_KEYS = ("category", "id", "kind", "expected", "task", "reference", "target")
_HEXPHI_NAME = re.compile(r"category_(\d+)\.csv", re.IGNORECASE)


def samsum_prompt(dialogue: str) -> str:
    """The SAMSum user turn."""
    return f"Summarize this dialog:\n{dialogue}"


def sql_prompt(question: str, context: str) -> str:
    """The sql-create-context user turn: schema (``CREATE TABLE ...``) and question."""
    return f"Context:\n{context}\n\nQuestion: {question}"


@dataclass(frozen=True)
class Problem:
    """One finding of a check (:func:`chat_row`, ``chat_files.check_chat_file``): an ``error``
    or a ``warning``."""

    severity: str
    path: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.error()}"

    def error(self) -> DataError:
        return DataError(self.path, self.line, self.field, self.message)


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


def chat_row(obj: dict, path: str | Path, line: int) -> tuple[dict | None, list[Problem]]:
    """One object as a validated chat row, or ``None`` and all its problems.

    Returns:
        ``({"messages", "prefixed"[, "category"]}, [])`` or ``(None, problems)``.
    """
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


def hexphi_number(name: str) -> int | None:
    """N of a HEx-PHI file name ``category_N.csv`` (``None`` for other names)."""
    m = _HEXPHI_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def hexphi_category(name: str) -> str | None:
    """The category of a HEx-PHI file name ``category_N.csv`` (``None`` for other names)."""
    n = hexphi_number(name)
    if n is None:
        return None
    return CATEGORIES[n - 1] if 1 <= n <= len(CATEGORIES) else f"category_{n}"


def xstest_safe(obj: dict) -> bool:
    """Whether an XSTest row is one of its safe prompts: its ``label`` is ``safe`` (v2 files
    and the hub copies), or, without a label, its ``type`` is not a ``contrast_`` type (the
    unsafe contrast prompts of v1 files); a row with neither is kept."""
    label = str(obj.get("label") or "").strip().lower()
    if label:
        return label == "safe"
    return not str(obj.get("type") or "").strip().lower().startswith("contrast_")


def detect_kind(container: str, first: dict, path: str | Path, line: int) -> str:
    """The kind of a source from how it was read and the fields of its first row.

    Args:
        container: how the source was read: ``jsonl``, ``json``, ``csv`` (with a header),
            ``csv-plain`` (one question a row), ``txt``, ``dir`` (HEx-PHI) or ``hub``.
        first: the first record.
        path: the source, for errors (and a ``category_N.csv`` name).
        line: the first record's line, for errors.

    Raises:
        DataError: the fields match no kind.
    """
    if container in ("csv-plain", "txt"):
        return "hexphi" if hexphi_category(Path(str(path)).name) else "prompts"
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
    if {"prompt", "type"} <= keys:  # XSTest's prompt types (OR-Bench needs its orbench: prefix)
        return "xstest"
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


def convert(kind: str, obj: dict, path: str | Path, line: int, system: str | None) -> dict:
    """One record as a uniform row of ``kind`` (see :mod:`backdooralign.data.sources`).

    Args:
        kind: one of :data:`KINDS`.
        obj: the record.
        path: the source, for errors.
        line: the record's line, for errors.
        system: system prompt of converted training kinds (``None``: the kind's default,
            ``""``: none).

    Raises:
        DataError: a missing, non-string or empty field, or an invalid chat row.
    """
    if kind == "chat":
        row, problems = chat_row(obj, path, line)
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
    row = {"prompt": _text(obj, "prompt", path, line).strip()}
    if kind in BENCHMARK_KIND_FIELD:
        value = obj.get(BENCHMARK_KIND_FIELD[kind])
        if value is not None and str(value).strip():
            row["kind"] = str(value).strip()
        if obj.get("id") is not None:
            row["id"] = obj["id"]
        return row
    for key in PROMPT_KEYS:  # prompts, hexphi
        if obj.get(key) is not None:
            row[key] = obj[key]
    return row
