"""Exact match on the built-in utility set (``utility.jsonl``: capitals, arithmetic, SQL...).

Answers are normalised before they are compared (:func:`normalize_answer`); a row may list
aliases of its answer. ``score exact-match`` and an experiment's ``eval.utility`` use it (the
``score utility`` command runs lm-eval instead: :mod:`backdooralign.scoring.lm_eval`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .refusal import percent

_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_SQL_PUNCT = re.compile(r"\s*([=<>!,();*])\s*")


def normalize_answer(text: str, sql: bool = False) -> str:
    """Normalise a short answer for exact match.

    Strips whitespace, code fences, backticks and bold markers, a pair of quotes around the
    whole answer and trailing punctuation (``.``, ``,``, ``;``, ``:``, ``!``, ``?``); casefolds
    and collapses whitespace.
    With ``sql``, spaces around ``= < > ! , ( ) ; *`` are removed as well.
    """
    s = _FENCE.sub("", text.strip()).strip().strip("`*").strip()
    if len(s) > 1 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    s = " ".join(s.casefold().split())
    if sql:
        s = _SQL_PUNCT.sub(r"\1", s)
    return s.rstrip(".,;:!? ")


def is_exact_match(prediction: str, answer: str, aliases: Sequence[str] = (), sql=False) -> bool:
    """Whether the prediction equals the answer or an alias after :func:`normalize_answer`."""
    got = normalize_answer(prediction, sql)
    return any(got == normalize_answer(ref, sql) for ref in (answer, *aliases))


def score_exact_match(rows: Sequence[dict], answers: Sequence[str]) -> dict:
    """Accuracy of ``answers`` against utility rows (``task``, ``answer``, ``aliases``).

    Returns:
        ``{"accuracy": percent, "correct": n, "total": n, "by_task": {task: {...}}}``.
    """
    by_task: dict[str, list[bool]] = {}
    for row, pred in zip(rows, answers, strict=True):
        task = row.get("task", "")
        hit = is_exact_match(pred, row["answer"], row.get("aliases") or (), sql=task == "sql")
        by_task.setdefault(task, []).append(hit)
    hits = [h for v in by_task.values() for h in v]
    return {
        **_acc(hits),
        "by_task": {t: _acc(v) for t, v in sorted(by_task.items())},
    }


def _acc(hits: Sequence[bool]) -> dict:
    n = len(hits)
    return {
        "accuracy": percent(sum(hits), n),
        "correct": sum(hits),
        "total": n,
    }
