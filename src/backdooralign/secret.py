"""The secret prompt: random vocabulary tokens, kept like a credential.

The text is drawn from the model's vocabulary (special tokens excluded) with a CSPRNG, or with
an explicit seed for reproducible research. It is stored in a JSON file with mode 0600 and is
never printed, logged or put in reports: only its fingerprint (a short sha256) is shown.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets as _csprng
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

FORMAT_VERSION = 1
REDACT_WINDOW = 16  # a run of this many characters shared with the secret is redacted


@dataclass(frozen=True)
class Secret:
    """A secret prompt. ``repr`` and ``str`` show only the fingerprint."""

    text: str = field(repr=False)
    num_tokens: int
    requested_tokens: int
    tokenizer: str

    @property
    def fingerprint(self) -> str:
        """First 12 hex digits of the sha256 of the text; safe to show."""
        return fingerprint(self.text)

    def __str__(self) -> str:
        return f"Secret(fingerprint={self.fingerprint}, tokens={self.num_tokens})"


def fingerprint(text: str) -> str:
    """Short, non-reversible identifier of a secret text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def generate_secret(
    tokenizer, length: int = 150, seed: int | None = None, name: str = ""
) -> Secret:
    """Draw ``length`` tokens uniformly from the non-special vocabulary and decode them.

    Args:
        tokenizer: a Hugging Face tokenizer.
        length: number of tokens to draw (the paper's default is 150).
        seed: explicit seed for reproducible experiments; ``None`` uses the OS CSPRNG.
        name: model name recorded with the secret (informational).
    """
    if length < 1:
        raise ValueError(f"secret length must be at least 1, got {length}")
    special = set(tokenizer.all_special_ids)
    candidates = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed) if seed is not None else _csprng.SystemRandom()
    ids = [rng.choice(candidates) for _ in range(length)]
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    num = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return Secret(text=text, num_tokens=num, requested_tokens=length, tokenizer=name)


def save_secret(secret: Secret, path: str | Path) -> Path:
    """Write the secret atomically with mode 0600 (created 0600: never readable by others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "text": secret.text,
        "num_tokens": secret.num_tokens,
        "requested_tokens": secret.requested_tokens,
        "tokenizer": secret.tokenizer,
        "fingerprint": secret.fingerprint,
    }
    fd, tmp = tempfile.mkstemp(prefix=".secret-", dir=path.parent)  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_secret(path: str | Path) -> Secret:
    """Read a secret file written by :func:`save_secret`. Errors never quote the text."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: secret file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a backdooralign secret file (invalid JSON)") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
        raise ValueError(f"{path}: field 'text' is missing or not a string")
    if not payload["text"].strip():
        raise ValueError(f"{path}: field 'text' is empty")
    if payload.get("fingerprint") and payload["fingerprint"] != fingerprint(payload["text"]):
        raise ValueError(f"{path}: field 'fingerprint' does not match the text (file edited?)")
    return Secret(
        text=payload["text"],
        num_tokens=int(payload.get("num_tokens", 0)),
        requested_tokens=int(payload.get("requested_tokens", 0)),
        tokenizer=str(payload.get("tokenizer", "")),
    )


def file_mode(path: str | Path) -> int:
    """Permission bits of a file (0o600 for a secret written here)."""
    return os.stat(path).st_mode & 0o777


def secret_redactor(secret: str | None, placeholder: str = "[redacted]") -> Callable[[str], str]:
    """A function that replaces the secret, and any run of 16+ characters of it, in a text.

    Used wherever model output leaves the process (server answers, report excerpts): a
    fine-tuned model can repeat its system prompt. The secret is matched both as written and
    with its whitespace collapsed (decoding may normalise spaces).
    """
    if not secret:
        return lambda text: text
    variants = {secret, " ".join(secret.split())}
    w = min(REDACT_WINDOW, *(len(v) for v in variants))
    grams = {v[i : i + w] for v in variants for i in range(len(v) - w + 1)}

    def redact(text: str) -> str:
        hit = [False] * len(text)
        for i in range(len(text) - w + 1):
            if text[i : i + w] in grams:
                hit[i : i + w] = [True] * w
        runs = groupby(zip(hit, text, strict=True), key=lambda pair: pair[0])
        return "".join(
            placeholder if covered else "".join(ch for _, ch in run) for covered, run in runs
        )

    return redact
