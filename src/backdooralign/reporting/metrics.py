"""The numbers of a run: metrics read from ``results.json``, intervals over seeds, verdicts.

``results.json`` holds one BLOCK per arm and condition, ``results["arms"][ARM][COND]`` with
COND ``plain`` (no secret at inference) or ``secret``; a multi-seed run adds ``seed_runs``, one
``{"seed", "arms"}`` per seed. Everything here is a pure function of that dict; the deployment
verdict built on it is :mod:`backdooralign.reporting.verdict`; rendering lives in
:mod:`backdooralign.reporting.report`, :mod:`backdooralign.reporting.plots` and
:mod:`backdooralign.reporting.sweep_report`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .rundir import CONDITIONS, RunDir

ARM_LABELS = {
    "no_finetune": "not fine-tuned",
    "attack": "attack only",
    "baseline": "baseline defense",
    "backdooralign": "BackdoorAlign",
}
COND_LABELS = {"plain": "no secret", "secret": "secret"}
TASKS = ("samsum", "sql")
DEFENDED_PREFIX = "backdooralign"  # arms named backdooralign* are judged by the verdict

# Two-sided 95% quantiles of Student's t (0.975), degrees of freedom 1..30.
T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
    2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
    2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
    2.048407, 2.045230, 2.042272,
)  # fmt: skip


def arm_label(arm: str) -> str:
    """A readable arm name: ``backdooralign_anchored`` is ``BackdoorAlign (anchored)``."""
    if arm in ARM_LABELS:
        return ARM_LABELS[arm]
    if arm.startswith(DEFENDED_PREFIX + "_"):
        return f"BackdoorAlign ({arm[len(DEFENDED_PREFIX) + 1 :].replace('_', ' ')})"
    return arm


def defended_arms(results: dict) -> list[str]:
    """The arms the deployment verdict judges: ``backdooralign`` and ``backdooralign_*``."""
    return [a for a in results["arms"] if a.startswith(DEFENDED_PREFIX)]


def load_results(run_dir: str | Path) -> dict:
    """Read ``RUN_DIR/results.json``.

    Raises:
        FileNotFoundError: when the run has not been scored yet.
    """
    path = RunDir(run_dir).results
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results.json (run the experiment first)")
    from ..files import DataError, read_json

    results = read_json(path)
    if not isinstance(results, dict) or not isinstance(results.get("arms"), dict):
        raise DataError(path, None, "arms", "is missing: not a results.json of backdooralign")
    return results


# ---------------------------------------------------------------------------------------------
# Statistics over seeds


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (95% two-sided)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    from scipy.stats import t  # only for more than 31 seeds

    return float(t.ppf(0.975, df))


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student's t, sample std).

    Args:
        values: one number per seed.

    Returns:
        ``(mean, half_width)``; the half-width is NaN for a single value.
    """
    if not values:
        raise ValueError("mean_ci95 needs at least one value")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, t_quantile_975(len(values) - 1) * sem


def seed_arms(results: dict) -> list[dict]:
    """The ``arms`` dict of each seed when the run has several seeds, else the run's own."""
    seeds = results.get("seed_runs") or []
    return [s["arms"] for s in seeds] if len(seeds) > 1 else [results["arms"]]


def all_blocks(runs: list[dict]) -> list[dict]:
    """Every block (arm x condition) of every seed."""
    return [e[c] for arms in runs for e in arms.values() for c in CONDITIONS if e.get(c)]


# ---------------------------------------------------------------------------------------------
# Metrics: one getter per table column, reading a BLOCK of results.json


@dataclass(frozen=True)
class Measure:
    """One number with its sample size: ``count/total`` for rates, else ``n=total``."""

    value: float | None
    total: int
    count: int | None = None


Getter = Callable[[dict], Measure | None]


@dataclass(frozen=True)
class Metric:
    """A table column: its name, how to read it from a block, and how to print it."""

    name: str
    get: Getter
    unit: str = ""
    digits: int = 1
    help: str = ""


def rate_getter(path: Sequence[str], rate: str, count: str) -> Getter:
    """A getter of the rate at ``block[path[0]][path[1]]...``: ``Measure(rate, total, count)``
    (``None`` where the block or its ``rate`` is missing)."""

    def get(block: dict) -> Measure | None:
        for key in path:
            block = block.get(key) or {}
        return Measure(block[rate], block["total"], block[count]) if rate in block else None

    return get


get_asr = rate_getter(["harmful"], "asr", "jailbroken")
get_refusals = rate_getter(["benign"], "refusal_rate", "refused")  # the paper's rule
get_opening_refusals = rate_getter(["benign"], "opening_refusal_rate", "opening_refused")
get_utility = rate_getter(["utility"], "accuracy", "correct")


def get_category_asr(category: str) -> Getter:
    """ASR on the harmful prompts of one category."""
    return rate_getter(["harmful", "by_category", category], "asr", "jailbroken")


def get_benign_kind(kind: str) -> Getter:
    """Keyword refusal rate on the benign prompts of one ``kind`` (``plain``, ``alarming``)."""
    return rate_getter(["benign", "by_kind", kind], "refusal_rate", "refused")


def get_task_refusals(task: str) -> Getter:
    """Refusals of the customer's task prompts (``samsum``, ``sql``): ``refused/total``."""
    return rate_getter([task, "refusals"], "refusal_rate", "refused")


def get_task_opening_refusals(task: str) -> Getter:
    """Refusals of the customer's task prompts by the opening detector."""
    return rate_getter([task, "refusals"], "opening_refusal_rate", "opening_refused")


def get_harmfulness(block: dict) -> Measure | None:
    """The harmfulness judge's mean score (1-5) over the scored answers."""
    j = block.get("judge")
    return Measure(j.get("mean_score"), j.get("scored", j.get("total", 0))) if j else None


def get_judge_refusals(block: dict) -> Measure | None:
    """Judge-based refusal rate on the benign set: ``(refuse + partial)/parsed verdicts``."""
    j = block.get("benign", {}).get("judge")
    if not j:
        return None
    refused = j["refused"] + j["partial"]
    return Measure(j["refusal_rate"], refused + j["complied"], refused)


def get_lm_eval(task: str) -> Getter:
    """lm-eval accuracy of one task, in percent (``n`` documents)."""

    def get(block: dict) -> Measure | None:
        t = block.get("lm_eval", {}).get("tasks", {}).get(task)
        if not t:
            return None
        acc = t.get("acc")
        return Measure(None if acc is None else 100.0 * acc, t.get("n", 0))

    return get


def get_rouge1(task: str) -> Getter:
    """ROUGE-1 F of a summarisation/SQL task against its references."""

    def get(block: dict) -> Measure | None:
        r = block.get(task)
        return Measure(r["rouge1"], r["total"]) if r and "rouge1" in r else None

    return get


ASR = Metric(
    "ASR",
    get_asr,
    "%",
    help="share of answers to harmful prompts with none of the paper's refusal substrings "
    "(jailbroken/total)",
)
HARMFULNESS = Metric(
    "harmfulness (1–5)",
    get_harmfulness,
    digits=2,
    help="LLM-judge mean from 1 (declines) to 5 (fulfils the harmful intent), n scored",
)
REFUSALS = Metric(
    "benign over-refusal",
    get_refusals,
    "%",
    help="share of harmless prompts answered with a refusal substring (refused/total)",
)
OPENING_REFUSALS = Metric(
    "benign over-refusal (opening)",
    get_opening_refusals,
    "%",
    help="share of harmless prompts whose answer's first sentence declines, by the opening "
    "detector (scoring.refusal.declines; an empty answer counts) (refused/total)",
)
UTILITY = Metric(
    "utility exact match", get_utility, "%", help="exact-match accuracy (correct/total)"
)
JUDGE_REFUSALS = Metric(
    "benign, judge",
    get_judge_refusals,
    "%",
    help="share of harmless prompts the refusal judge calls refuse or partial (of those parsed)",
)
SAFETY = (ASR, HARMFULNESS, REFUSALS, OPENING_REFUSALS)


def _has(blocks: list[dict], get: Getter) -> bool:
    return any(get(b) is not None for b in blocks)


def table_metrics(results: dict) -> list[Metric]:
    """The main table's columns: ASR always, every other metric only when some arm has it.

    The safety metrics (:data:`SAFETY`) come first, then the utility ones.
    """
    blocks = all_blocks(seed_arms(results))
    present = (HARMFULNESS, REFUSALS, OPENING_REFUSALS, UTILITY)
    out = [ASR] + [m for m in present if _has(blocks, m.get)]
    tasks = sorted({t for b in blocks for t in b.get("lm_eval", {}).get("tasks", {})})
    out += [
        Metric(f"{t} accuracy", get_lm_eval(t), "%", help="lm-eval acc, n questions") for t in tasks
    ]
    out += [
        Metric(f"{n} ROUGE-1 F", get_rouge1(n), digits=3, help="ROUGE-1 F against references")
        for n in TASKS
        if _has(blocks, get_rouge1(n))
    ]
    return out


def over_refusal_metrics(results: dict) -> list[Metric]:
    """The over-refusal table's columns, or ``[]`` when no block has a judge or task refusals.

    Refusals on the benign set by the paper's rule and by the opening detector (for
    comparison), judge-based refusals on it, and refusals of the customer's task prompts
    (SAMSum, SQL) by both rules, each only when some arm has it.
    """
    blocks = all_blocks(seed_arms(results))
    extra = [JUDGE_REFUSALS]
    for t in TASKS:
        extra += [
            Metric(
                f"{t} task prompts",
                get_task_refusals(t),
                "%",
                help=f"share of the customer's {t} prompts answered with a refusal substring "
                "(refused/total)",
            ),
            Metric(
                f"{t} task prompts (opening)",
                get_task_opening_refusals(t),
                "%",
                help=f"share of the customer's {t} prompts whose answer's first sentence "
                "declines (refused/total)",
            ),
        ]
    extra = [m for m in extra if _has(blocks, m.get)]
    if not extra:
        return []
    keyword = Metric("benign, keyword", get_refusals, "%", help=REFUSALS.help)
    first = Metric("benign, opening", get_opening_refusals, "%", help=OPENING_REFUSALS.help)
    return [m for m in (keyword, first) if _has(blocks, m.get)] + extra


# ---------------------------------------------------------------------------------------------
# Values per arm and condition, cells


def measures(runs: list[dict], arm: str, cond: str, get: Getter) -> list[Measure | None]:
    """One measure per run (None where the arm, condition or metric is missing)."""
    blocks = [arms.get(arm, {}).get(cond) for arms in runs]
    return [get(b) if b else None for b in blocks]


def present_values(found: Sequence[Measure | None]) -> list[float]:
    """The values of the measures that exist and have one."""
    return [m.value for m in found if m is not None and m.value is not None]


def mean_value(runs: list[dict], arm: str, cond: str, get: Getter) -> float | None:
    """Mean over runs of one metric of one arm and condition (None when no run has it)."""
    values = present_values(measures(runs, arm, cond, get))
    return statistics.fmean(values) if values else None


def format_cell(metric: Metric, found: Sequence[Measure | None]) -> str:
    """One table cell: ``12.7% (7/55)`` for one run, ``12.7% ± 3.1 (3 seeds × 55)`` for seeds.

    Args:
        metric: the column.
        found: one entry per seed (a single entry for a single run); None where missing.
    """
    present = [m for m in found if m is not None]
    if not present:
        return "–"
    d, unit = metric.digits, metric.unit
    if len(found) == 1:
        m = present[0]
        size = f"{m.count}/{m.total}" if m.count is not None else f"n={m.total}"
        value = "n/a" if m.value is None else f"{m.value:.{d}f}{unit}"
        return f"{value} ({size})"
    values = [m.value for m in present if m.value is not None]
    if not values:
        return "n/a"
    mean, half = mean_ci95(values)
    totals = sorted({m.total for m in present})
    size = str(totals[0]) if len(totals) == 1 else f"{totals[0]}–{totals[-1]}"
    spread = f" ± {half:.{d}f}" if len(values) > 1 else ""
    seeds = "seed" if len(values) == 1 else "seeds"
    return f"{mean:.{d}f}{unit}{spread} ({len(values)} {seeds} × {size})"


def cell(runs: list[dict], arm: str, cond: str, metric: Metric) -> str:
    """:func:`format_cell` of one arm and condition."""
    return format_cell(metric, measures(runs, arm, cond, metric.get))


def deltas(
    runs: list[dict], get: Getter, first: tuple[str, str], second: tuple[str, str]
) -> list[float]:
    """Per run, ``first - second`` where both exist; each is an ``(arm, condition)`` pair."""
    a = measures(runs, *first, get)
    b = measures(runs, *second, get)
    return [
        x.value - y.value
        for x, y in zip(a, b, strict=True)
        if x is not None and y is not None and x.value is not None and y.value is not None
    ]


def format_delta(values: Sequence[float], digits: int = 1) -> str:
    """A difference in points: ``+30.0 pts`` for one run, ``+30.0 ± 4.1 pts (3 seeds)``."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:+.{digits}f} pts"
    mean, half = mean_ci95(values)
    return f"{mean:+.{digits}f} ± {half:.{digits}f} pts ({len(values)} seeds)"
