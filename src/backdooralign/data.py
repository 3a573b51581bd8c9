"""Reading, validating and mixing datasets.

Customer data is OpenAI chat JSONL (``{"messages": [...]}``), optionally with the paper's
``"prefixed": true|false`` flag marking safety examples that receive the secret. Built-in sets
live in ``backdooralign/datasets``. ``build_training_set`` mixes the arms of the experiment:

- ``attack``: the customer data alone (rows flagged ``prefixed`` are dropped);
- ``baseline``: plus the safety examples with the normal system prompt;
- ``backdooralign``: plus the safety examples with ``SECRET + " " + system prompt``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from .chat import ATTACK_SYSTEM_PROMPT, ROLES, build_conversation

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


class DataError(ValueError):
    """A problem in an input file, located by file, line and field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = self.path + (f":{line}" if line else "")
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")


# ---------------------------------------------------------------------------------------------
# Files


def builtin_path(name: str) -> Path:
    """Path of a built-in dataset file, e.g. ``builtin_path("safety")``."""
    return Path(str(resources.files("backdooralign") / "datasets" / f"{name}.jsonl"))


def resolve_source(source: str | Path) -> Path:
    """``builtin:NAME`` names a built-in set; anything else is a path."""
    s = str(source)
    return builtin_path(s.removeprefix("builtin:")) if s.startswith("builtin:") else Path(s)


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, with clear errors for missing, empty, BOM and bad encoding."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(path, None, None, "file is empty")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise DataError(
            path, 1, None, "file starts with a UTF-8 byte-order mark; save it without BOM"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, line, None, f"not valid UTF-8 (byte {e.start})") from None


def read_jsonl(path: str | Path, max_line_chars: int = MAX_LINE_CHARS) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line; every line must be a JSON object."""
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > max_line_chars:
            raise DataError(path, lineno, None, f"line longer than {max_line_chars} characters")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, lineno, None, f"invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(path, lineno, None, "each line must be a JSON object")
        rows.append((lineno, obj))
    return rows


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


# ---------------------------------------------------------------------------------------------
# Chat data


def validate_messages(messages, path: str | Path, line: int) -> list[dict]:
    """Check one ``messages`` list: roles known and in order, contents non-empty strings."""
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, "messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(path, line, where, "must be an object with 'role' and 'content'")
        role = m.get("role")
        if role is None:
            raise DataError(path, line, f"{where}.role", "is missing")
        if role not in ROLES:
            raise DataError(path, line, f"{where}.role", f"unknown role {role!r}")
        if role == "system" and i != 0:
            raise DataError(path, line, f"{where}.role", "a system message may only come first")
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(path, line, f"{where}.content", "must be a string")
        if not content.strip():
            raise DataError(path, line, f"{where}.content", "is empty")
        out.append({"role": role, "content": content})
    turns = [m["role"] for m in out if m["role"] != "system"]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(
                path,
                line,
                "messages",
                f"roles out of order: turn {i + 1} is {role}, expected {expected}",
            )
    if "assistant" not in turns:
        raise DataError(path, line, "messages", "conversation has no assistant turn")
    return out


def load_chat_jsonl(path: str | Path, max_rows: int | None = None) -> list[dict]:
    """Load and validate OpenAI chat JSONL (optional ``prefixed`` and ``category`` fields)."""
    rows = []
    for line, obj in read_jsonl(path):
        messages = validate_messages(obj.get("messages"), path, line)
        prefixed = obj.get("prefixed", False)
        if not isinstance(prefixed, bool):
            raise DataError(path, line, "prefixed", "must be true or false")
        row = {"messages": messages, "prefixed": prefixed}
        if obj.get("category") is not None:
            row["category"] = str(obj["category"])
        rows.append(row)
        if max_rows is not None and len(rows) > max_rows:
            raise DataError(path, line, None, f"more than {max_rows} rows (the configured cap)")
    return rows


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


def load_training_source(source: str | Path, system: str | None = None) -> list[dict]:
    """Chat rows from a chat JSONL or a question/answer JSONL (e.g. ``builtin:attack``)."""
    path = resolve_source(source)
    first = read_jsonl(path)[0][1]
    if "messages" in first:
        return load_chat_jsonl(path)
    return qa_to_chat(load_qa(path), system if system is not None else ATTACK_SYSTEM_PROMPT)


def select_per_category(
    rows: Sequence[dict], per_category: int, seed: int | None = None
) -> list[dict]:
    """Up to ``per_category`` rows of each category, in file order or seeded random order."""
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r.get("category") or "", []).append(r)
    out = []
    for cat in sorted(by_cat, key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else 99, c)):
        items = list(by_cat[cat])
        if seed is not None:
            random.Random(f"{seed}:{cat}").shuffle(items)
        out.extend(items[:per_category])
    return out


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


def build_manifest(arm: str, rows: Sequence[dict], inputs: dict[str, str], secret=None) -> dict:
    """What a training set was built from: inputs' sha256, counts, the secret's fingerprint."""
    return {
        "arm": arm,
        "inputs": {
            name: {"source": str(src), "sha256": sha256_of(resolve_source(src))}
            for name, src in inputs.items()
        },
        "counts": {
            "total": len(rows),
            "by_source": dict(Counter(r.get("source", "customer") for r in rows)),
            "by_category": dict(sorted(Counter(r.get("category", "") for r in rows).items())),
        },
        "secret_fingerprint": secret.fingerprint
        if secret is not None and arm == "backdooralign"
        else None,
    }


def _meta(row: dict, source: str) -> dict:
    meta = {"source": source}
    if row.get("category"):
        meta["category"] = row["category"]
    return meta


# ---------------------------------------------------------------------------------------------
# Prompts for generation


def load_prompts(path: str | Path) -> list[dict]:
    """Prompts from CSV (first column), TXT (a line each) or JSONL (``prompt`` or ``messages``).

    Each row is ``{"prompt": str}`` plus ``category``/``messages``/``id`` when the input has them.
    """
    path = resolve_source(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for line, obj in read_jsonl(path):
            if "messages" in obj:
                msgs = obj["messages"]
                if not isinstance(msgs, list) or not msgs:
                    raise DataError(path, line, "messages", "must be a non-empty list")
                users = [
                    m.get("content")
                    for m in msgs
                    if isinstance(m, dict) and m.get("role") == "user"
                ]
                if not users or not isinstance(users[-1], str):
                    raise DataError(path, line, "messages", "has no user message")
                row = {"prompt": users[-1], "messages": msgs}
            else:
                prompt = obj.get("prompt")
                if not isinstance(prompt, str) or not prompt.strip():
                    raise DataError(path, line, "prompt", "must be a non-empty string")
                row = {"prompt": prompt}
            for key in ("category", "id", "kind", "expected"):
                if obj.get(key) is not None:
                    row[key] = obj[key]
            rows.append(row)
        return rows
    text = read_text(path)
    if suffix == ".csv":
        rows = []
        for line, rec in enumerate(csv.reader(io.StringIO(text)), 1):
            if not rec or not rec[0].strip():
                continue
            rows.append({"prompt": rec[0].strip()})
        return rows
    if suffix in (".txt", ""):
        return [{"prompt": s.strip()} for s in text.splitlines() if s.strip()]
    raise DataError(path, None, None, f"unsupported prompt file type {suffix!r} (csv, txt, jsonl)")


def limit_per_category(rows: Sequence[dict], per_category: int | None) -> list[dict]:
    """Keep the first ``per_category`` rows of each category (all rows when ``None``)."""
    if per_category is None:
        return list(rows)
    seen: Counter[str] = Counter()
    out = []
    for r in rows:
        cat = r.get("category") or ""
        if seen[cat] < per_category:
            out.append(r)
            seen[cat] += 1
    return out
