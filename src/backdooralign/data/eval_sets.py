"""Evaluation sets: the prompts every arm answers, with and without the secret.

One loader for experiments, the service's evaluation after training and the ``score``
commands that answer prompts first. :func:`load_eval_prompts` keeps the first N prompts of
each category (harmful sets) or kind (benign sets), :func:`load_utility` the exact-match
questions of each task, and :func:`eval_sets` builds every set an experiment's ``eval`` section
asks for. Whenever fewer prompts are used than a source holds, the notes say so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..files import DataError, read_jsonl
from .mixing import limit_per_category
from .sources import load_prompts, resolve_source

log = logging.getLogger(__name__)

TASK_SETS = ("samsum", "sql")


@dataclass(frozen=True)
class EvalSet:
    """Prompts answered by every arm, with and without the secret."""

    rows: list[dict]
    system: str | None  # None: each row's own system prompt (task rows carry theirs)
    max_new_tokens: int


def load_eval_prompts(
    source: str, limit: int | None, key: str = "category"
) -> tuple[list[dict], list[str]]:
    """The prompts of ``source``, the first ``limit`` of each value of ``key`` (all when
    ``None``), and a note when fewer are used than there are."""
    rows = load_prompts(source)
    kept = limit_per_category(rows, limit, key=key)
    if len(kept) < len(rows):
        return kept, [f"{source}: using {len(kept)} of {len(rows)} prompts ({limit} per {key})"]
    return kept, []


def load_utility(source: str, per_task: int | None = None) -> tuple[list[dict], list[str]]:
    """Exact-match prompts (``prompt``, ``task``, ``answer``, ``aliases``) as generation rows
    carrying ``reference`` and ``aliases``, the first ``per_task`` of each task, and notes."""
    rows = []
    for line, obj in read_jsonl(resolve_source(source)):
        for key in ("prompt", "answer"):
            if not isinstance(obj.get(key), str):
                raise DataError(source, line, key, "is missing or not a string")
        aliases = obj.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise DataError(source, line, "aliases", "must be a list of strings")
        rows.append(
            {
                "prompt": obj["prompt"],
                "id": obj.get("id", f"utility-{line}"),
                "task": str(obj.get("task", "")),
                "reference": obj["answer"],
                "aliases": aliases,
            }
        )
    kept = limit_per_category(rows, per_task, key="task")
    notes = [f"{source}: using {len(kept)} of {len(rows)} prompts ({per_task} per task)"]
    return kept, notes if len(kept) < len(rows) else []


def _logged(found: tuple[list[dict], list[str]]) -> list[dict]:
    rows, notes = found
    for note in notes:
        log.warning("%s", note)
    return rows


def eval_sets(cfg) -> dict[str, EvalSet]:
    """The evaluation sets an experiment's :class:`~backdooralign.experiments.config.EvalConfig`
    asks for (the notes on prompts left out are logged)."""
    harmful = _logged(load_eval_prompts(cfg.harmful, cfg.harmful_per_category))
    sets = {"harmful": EvalSet(harmful, cfg.system_prompt, cfg.max_new_tokens)}
    if cfg.benign:
        benign = _logged(load_eval_prompts(cfg.benign, cfg.benign_limit, key="kind"))
        sets["benign"] = EvalSet(benign, cfg.system_prompt, cfg.max_new_tokens)
    if cfg.utility:
        rows = _logged(load_utility(cfg.utility, cfg.utility_limit))
        sets["utility"] = EvalSet(rows, cfg.utility_system, cfg.utility_max_new_tokens)
    for name in TASK_SETS:
        source = getattr(cfg, name)
        if source:
            rows = load_prompts(source)
            kept = rows[: cfg.task_limit]
            if len(kept) < len(rows):
                log.warning("%s: using %d of %d rows (task_limit)", source, len(kept), len(rows))
            sets[name] = EvalSet(kept, None, cfg.task_max_new_tokens)
    return sets
