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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import SEED_MAX, option
from ..files import refuse_special, write_json
from .chat import find_control_token

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Secret:
    """A secret prompt. ``repr`` and ``str`` show only the fingerprint."""

    text: str = field(repr=False)
    num_tokens: int
    requested_tokens: int
    tokenizer: str
    vocab: str = ""  # vocabulary fingerprint of the tokenizer it was drawn from ("" if unknown)

    @property
    def fingerprint(self) -> str:
        """First 12 hex digits of the sha256 of the text; safe to show."""
        return fingerprint(self.text)

    def __str__(self) -> str:
        return f"Secret(fingerprint={self.fingerprint}, tokens={self.num_tokens})"


def fingerprint(text: str) -> str:
    """Short, non-reversible identifier of a secret text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def vocabulary_ids(tokenizer) -> list[int]:
    """The token ids a secret is drawn from: every id but the special ones."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def draw_text(tokenizer, length: int, rng: random.Random, candidates: Sequence[int]) -> str:
    """``length`` tokens drawn uniformly from ``candidates`` and decoded; a text that is blank
    or spells a control token (such as ``<|im_end|>``) is drawn again from the same ``rng``."""
    while True:
        ids = [rng.choice(candidates) for _ in range(length)]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if text and find_control_token(tokenizer, text) is None:
            return text


def generate_secret(
    tokenizer, length: int = 150, seed: int | None = None, name: str = ""
) -> Secret:
    """Draw ``length`` tokens uniformly from the non-special vocabulary and decode them.

    A draw whose text is blank or spells a control token is drawn again (same generator), so
    a seed gives the same secret as before unless its text was unusable.

    Args:
        tokenizer: a Hugging Face tokenizer.
        length: number of tokens to draw (the paper's default is 150).
        seed: explicit seed for reproducible experiments; ``None`` uses the OS CSPRNG.
        name: model name recorded with the secret (informational).

    Returns:
        The secret, with its token count and its tokenizer's vocabulary fingerprint.
    """
    if length < 1:
        raise ValueError(f"secret length must be at least 1, got {length}")
    rng = random.Random(seed) if seed is not None else _csprng.SystemRandom()
    text = draw_text(tokenizer, length, rng, vocabulary_ids(tokenizer))
    num = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    vocab = vocab_fingerprint(tokenizer)
    return Secret(text, num_tokens=num, requested_tokens=length, tokenizer=name, vocab=vocab)


def save_secret(secret: Secret, path: str | Path) -> Path:
    """Write the secret atomically with mode 0600 (created 0600: never readable by others)."""
    payload = {
        "format": FORMAT_VERSION,
        "text": secret.text,
        "num_tokens": secret.num_tokens,
        "requested_tokens": secret.requested_tokens,
        "tokenizer": secret.tokenizer,
        "vocab": secret.vocab,
        "fingerprint": secret.fingerprint,
    }
    return write_json(path, payload, private=True)


def save_secret_once(secret: Secret, path: str | Path) -> Secret:
    """Save ``secret`` at ``path`` unless a secret is already there; returns the one there
    afterwards. For processes that may make the same secret at once (service workers on
    several machines, the shards of a sweep): the first one saved wins and all use it. The
    file appears whole or not at all and never replaces another (written beside it, then
    hard-linked into place: atomic on local and network filesystems)."""
    import threading

    path = Path(path)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    save_secret(secret, draft)
    try:
        os.link(draft, path)
    except FileExistsError:
        pass
    finally:
        draft.unlink(missing_ok=True)
    return load_secret(path)


def load_secret(path: str | Path) -> Secret:
    """Read a secret file written by :func:`save_secret`.

    A file readable by others (any group or other permission bit) still loads, with a warning
    saying how to fix it.

    Raises:
        FileNotFoundError: when there is no file.
        ValueError: naming the file (and the field) when it cannot be read or is not a valid
            secret file. Errors never quote the text.
    """
    path = Path(path)
    refuse_special(path)  # a FIFO would block forever
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: secret file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a secret file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the secret file ({e.strerror})") from None
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a backdooralign secret file (invalid JSON)") from None
    except RecursionError:
        raise ValueError(
            f"{path}: not a backdooralign secret file (JSON nested too deeply)"
        ) from None
    secret = _from_payload(payload, path)
    mode = file_mode(path)
    if mode & 0o077:
        warnings.warn(
            f"{path}: secret file has mode {mode:04o}, readable by others; run: chmod 600 {path}",
            stacklevel=2,
        )
    return secret


def _from_payload(payload: object, path: Path) -> Secret:
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not a backdooralign secret file (not a JSON object)")
    if payload.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"{path}: field 'format' must be {FORMAT_VERSION}")
    if not isinstance(payload.get("text"), str):
        raise ValueError(f"{path}: field 'text' is missing or not a string")
    if not payload["text"].strip():
        raise ValueError(f"{path}: field 'text' is empty")
    if payload.get("fingerprint") and payload["fingerprint"] != fingerprint(payload["text"]):
        raise ValueError(f"{path}: field 'fingerprint' does not match the text (file edited?)")
    for name in ("num_tokens", "requested_tokens"):
        value = payload.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{path}: field '{name}' must be a non-negative integer")
    for name in ("tokenizer", "vocab", "fingerprint"):
        if not isinstance(payload.get(name, ""), str):
            raise ValueError(f"{path}: field '{name}' must be a string")
    return Secret(
        text=payload["text"],
        num_tokens=payload.get("num_tokens", 0),
        requested_tokens=payload.get("requested_tokens", 0),
        tokenizer=payload.get("tokenizer", ""),
        vocab=payload.get("vocab", ""),
    )


def vocab_fingerprint(tokenizer) -> str:
    """Short sha256 of a tokenizer's vocabulary (token strings and ids): same tokens, same value."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:12]


def check_secret_tokenizer(secret: Secret, tokenizer) -> str | None:
    """A warning when ``secret`` was made for another tokenizer, else ``None``.

    The secret's recorded vocabulary fingerprint (files written since it was recorded) must
    match, and re-encoding its text must give its recorded token count. The model name it was
    made for is not compared: a fine-tuned model has another name and the same tokenizer.
    The message names fingerprints and counts, never the text.
    """
    problems = []
    if secret.vocab and secret.vocab != vocab_fingerprint(tokenizer):
        made_for = f" ({secret.tokenizer})" if secret.tokenizer else ""
        problems.append(f"it was made for another vocabulary{made_for}")
    count = len(tokenizer(secret.text, add_special_tokens=False)["input_ids"])
    if secret.num_tokens and count != secret.num_tokens:
        problems.append(f"it encodes to {count} tokens here, {secret.num_tokens} when made")
    if not problems:
        return None
    return (
        f"secret {secret.fingerprint} does not match this tokenizer: {'; '.join(problems)}. "
        "The model will see other tokens than the ones it was trained with."
    )


def file_mode(path: str | Path) -> int:
    """Permission bits of a file (0o600 for a secret written here)."""
    return os.stat(path).st_mode & 0o777


# ---------------------------------------------------------------------------------------------
# Making a secret for a run


SECRET_KINDS = ("random", "sentence", "system_repeat")
MEANINGFUL_SECRET = (
    "Answer as a careful and responsible assistant that follows the safety policy of this service."
)


@dataclass(frozen=True)
class SecretConfig:
    """Where the secret comes from: an existing file, or made for the run (paper: random)."""

    path: str | None = option(None, "existing secret file (mode 0600)", path=True)
    length: int = option(150, "tokens, when generating (paper: 150)", minimum=1)
    seed: int | None = option(
        None, "explicit seed when generating (null: OS CSPRNG)", minimum=0, maximum=SEED_MAX
    )
    kind: str = option(
        "random",
        "random vocabulary tokens (the paper's), a meaningful sentence, or the model's default "
        "system prompt repeated to the length (the paper's ablations)",
        choices=SECRET_KINDS,
    )
    sentence: str = option(MEANINGFUL_SECRET, "the text of a 'sentence' secret")

    def __post_init__(self) -> None:
        if self.kind == "sentence" and not self.sentence.strip():
            raise ValueError("field 'sentence': a 'sentence' secret needs a text, got an empty one")


def _default_system_prompt(tokenizer) -> str:
    """The system prompt a chat template inserts when a conversation has none ("" if none)."""
    probe = [{"role": "user", "content": "PROBE"}]
    own = tokenizer.apply_chat_template(probe, tokenize=False)
    marked = tokenizer.apply_chat_template(
        [{"role": "system", "content": "\x00"}, *probe], tokenize=False
    )
    if "\x00" not in marked:
        return ""
    head, tail = marked.split("\x00", 1)
    if not (own.startswith(head) and own.endswith(tail)) or len(own) <= len(head) + len(tail):
        return ""
    return own[len(head) : len(own) - len(tail)].strip()


def make_secret(cfg: SecretConfig, tokenizer, name: str = "") -> Secret:
    """A new secret of ``cfg.kind``: random tokens (CSPRNG, or ``cfg.seed``), a meaningful
    sentence, or the model's default system prompt repeated up to ``cfg.length`` tokens."""
    if cfg.kind == "random":
        return generate_secret(tokenizer, cfg.length, cfg.seed, name=name)
    if cfg.kind == "sentence":
        text = cfg.sentence
    else:
        base = _default_system_prompt(tokenizer) or "You are a helpful assistant."
        ids = tokenizer(" ".join([base] * (cfg.length + 1)), add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(ids[: cfg.length]).strip()
    if not text.strip():  # load_secret refuses an empty secret: never write one
        raise ValueError(f"the {cfg.kind} secret came out empty; give a text or another kind")
    num = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return Secret(text, num, cfg.length, name, vocab_fingerprint(tokenizer))
