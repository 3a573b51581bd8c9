"""Selection of safety examples and mixing of the arms' training sets, with their manifests.

Customer data is read and checked by :mod:`backdooralign.data.chat_files` (OpenAI chat JSONL)
or, in other shapes, by :mod:`backdooralign.data.sources`; customer data is
screened by :mod:`backdooralign.core.screen` before mixing. :func:`mix_arm` mixes the arms:

- ``attack``: the customer data alone;
- ``baseline``: plus the safety examples with the normal system prompt;
- ``backdooralign``: plus the safety examples (and benign anchors) with
  ``SECRET + " " + system prompt``.

Customer rows flagged ``prefixed`` are left out of every arm: the flag is provider-side, and
only the provider's safety source decides which rows get the secret
(:func:`~backdooralign.data.training_set.load_safety` reads a safety file's flagged rows).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..core.chat import ATTACK_SYSTEM_PROMPT, build_conversation
from .formats import CATEGORIES
from .sources import (
    source_sha256,
)

log = logging.getLogger(__name__)

ARMS = ("attack", "baseline", "backdooralign")
SAFETY_SELECTIONS = ("category-balanced", "random")


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


def _per_category(rows: Sequence[dict], per_category: int, seed: int | None) -> list[dict]:
    """Up to ``per_category`` rows of each category, in file order or seeded random order."""
    return [r for items in _by_category(rows, seed).values() for r in items[:per_category]]


def interleave(rows: Sequence[dict], count: int, key: str) -> list[dict]:
    """The first ``count`` rows taken in turn from each value of ``key`` (order of first
    appearance; file order within a value): the first of each value, then the second...
    Rows without ``key`` form one group, so a file without it gives its first ``count`` rows."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(key) or ""), []).append(r)
    out: list[dict] = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        for items in groups.values():
            if len(out) == count:
                return out
            if i < len(items):
                out.append(items[i])
    return out


def _round_robin(rows: Sequence[dict], count: int, seed: int | None) -> list[dict]:
    """``count`` rows balanced over categories: the first of each category, then the second..."""
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
    per_category: int | None = None,
    selection: str = "category-balanced",
    seed: int | None = None,
) -> list[dict]:
    """Choose the safety examples to mix in, deterministically.

    Args:
        rows: candidate safety rows (with ``category`` for a balanced choice).
        count: total number to choose.
        per_category: examples per category when ``count`` is ``None``. With neither, all
            rows are used, in file order (a user's own safety file is used whole).
        selection: ``category-balanced`` (round-robin over categories; the paper's choice) or
            ``random`` (a seeded sample that ignores categories).
        seed: order within categories (balanced; ``None`` keeps file order) or the sample's
            seed (random; ``None`` means 0).

    Raises:
        ValueError: an unknown ``selection``, or more examples asked for than there are.
    """
    if selection not in SAFETY_SELECTIONS:
        raise ValueError(
            f"unknown selection {selection!r}; expected one of {', '.join(SAFETY_SELECTIONS)}"
        )
    if count is None and per_category is None:
        return list(rows)
    if count is None and selection == "category-balanced":
        return _per_category(rows, per_category, seed)
    n = count if count is not None else per_category * len(_by_category(rows, None))
    if n > len(rows):
        raise ValueError(f"asked for {n} safety examples; only {len(rows)} are available")
    if selection == "random":
        return random.Random(seed if seed is not None else 0).sample(list(rows), n)
    return _round_robin(rows, n, seed)


def main_system_prompt(rows: Sequence[dict]) -> str:
    """The most common system prompt of the customer data (the paper's attack prompt if none)."""
    prompts = Counter(
        r["messages"][0]["content"] for r in rows if r["messages"][0]["role"] == "system"
    )
    return prompts.most_common(1)[0][0] if prompts else ATTACK_SYSTEM_PROMPT


def require_secret(arm: str, secret) -> None:
    """The one check that the ``backdooralign`` arm has its secret (text or ``Secret``).

    Raises:
        ValueError: for ``backdooralign`` without a secret.
    """
    if arm == "backdooralign" and not secret:
        raise ValueError("arm 'backdooralign' needs a secret (--secret FILE)")


def mix_arm(
    arm: str,
    customer: Sequence[dict],
    safety: Sequence[dict],
    secret: str | None = None,
    safety_system: str | None = None,
    seed: int = 0,
    *,
    anchors: Sequence[dict] = (),
) -> list[dict]:
    """Mix one arm's training set (chat rows, each with ``messages`` and a ``source``).

    Args:
        arm: ``attack``, ``baseline`` or ``backdooralign``.
        customer: the customer's chat rows; rows flagged ``prefixed`` are left out (customer
            data never decides which rows get the secret; the caller says so).
        safety: safety chat rows to add (system prompts are replaced by ``safety_system``).
        secret: secret text; required for ``backdooralign``.
        safety_system: system prompt of the safety examples (default: the customer's main one).
        seed: shuffle seed (the mixed set is shuffled deterministically).
        anchors: benign chat rows (user question, helpful answer) added to the
            ``backdooralign`` arm only, with the secret and the safety examples' system prompt,
            so the secret alone does not mean "refuse" (source ``anchor``).

    Raises:
        ValueError: an unknown arm, or ``backdooralign`` without a secret.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")
    require_secret(arm, secret)
    plain = [r for r in customer if not r.get("prefixed")]
    system = safety_system if safety_system is not None else main_system_prompt(plain)
    rows = [{"messages": r["messages"], **_meta(r, "customer")} for r in plain]
    if arm != "attack":
        key = secret if arm == "backdooralign" else None
        for r in safety:
            conv = build_conversation(r["messages"], system=system, secret=key)
            rows.append({"messages": conv, **_meta(r, "safety")})
    if arm == "backdooralign":
        for r in anchors:
            conv = build_conversation(r["messages"], system=system, secret=secret)
            rows.append({"messages": conv, "source": "anchor"})
    random.Random(seed).shuffle(rows)
    return rows


def manifest_path(training_set: str | Path) -> Path:
    """The manifest written beside a training set: ``train.jsonl`` -> ``train.manifest.json``."""
    path = Path(training_set)
    return path.with_name(f"{path.stem}.manifest.json")


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
