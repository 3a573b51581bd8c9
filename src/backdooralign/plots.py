"""The report's plots: matplotlib's Agg canvas through ``Figure`` (no pyplot, no global state).

Each plot reads ``results.json`` (as a dict) through the metrics of :mod:`backdooralign.report`
and is written as a PNG beside ``report.md``; ``report.html`` embeds them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

from .data import CATEGORIES, write_bytes_atomic
from .report import (
    ARM_LABELS,
    COND_LABELS,
    CONDITIONS,
    PLOTS,
    Measure,
    _asr,
    _blocks,
    _measures,
    _refusals,
    _runs,
    _values,
    mean_ci95,
)

COND_COLORS = {"plain": "#c44e52", "secret": "#4c72b0"}


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes_atomic(path, buf.getvalue())


def _stats(runs: list[dict], arm: str, cond: str, get: Callable) -> tuple[float, float]:
    """Mean and 95% CI half-width over runs (NaN mean when missing, 0 width for one run)."""
    values = _values(_measures(runs, arm, cond, get))
    if not values:
        return math.nan, math.nan
    mean, half = mean_ci95(values)
    return mean, 0.0 if math.isnan(half) else half


def plot_asr(results: dict, path: str | Path) -> Path:
    """Grouped bars: ASR per arm, without and with the secret (mean ± 95% CI over seeds)."""
    from matplotlib.figure import Figure

    runs, arms = _runs(results), list(results["arms"])
    fig = Figure(figsize=(7.5, 3.8), dpi=110)
    ax = fig.subplots()
    for k, cond in enumerate(CONDITIONS):
        stats = [_stats(runs, arm, cond, _asr) for arm in arms]
        bars = ax.bar(
            [i + (k - 0.5) * 0.4 for i in range(len(arms))],
            [s[0] for s in stats],
            0.4,
            yerr=[s[1] for s in stats] if len(runs) > 1 else None,
            capsize=3,
            label="no secret" if cond == "plain" else "secret at inference",
            color=COND_COLORS[cond],
        )
        ax.bar_label(bars, [_bar_text(s[0]) for s in stats], fontsize=8, padding=2)
    ax.set_xticks(range(len(arms)), [ARM_LABELS.get(a, a) for a in arms])
    ax.set_ylabel("attack success rate (%)")
    _percent_axis(ax)
    n = _first_total(runs, arms, _asr)
    seeds = f", mean ± 95% CI over {len(runs)} seeds" if len(runs) > 1 else ""
    ax.set_title(f"{results.get('name', 'run')}: ASR on {n} harmful prompts{seeds}", fontsize=10)
    ax.legend(frameon=False, fontsize=8, ncols=2, loc="upper center")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, Path(path))


def _first_total(runs: list[dict], arms: list[str], get: Callable) -> int | None:
    """The sample size of the first arm that has the metric (to name it in a plot title)."""
    found = (m for arm in arms for c in CONDITIONS for m in _measures(runs, arm, c, get) if m)
    return next((m.total for m in found), None)


def _percent_axis(ax) -> None:
    """0-100% ticks, with headroom above 100 for bar labels and the legend."""
    ax.set_ylim(0, 128)
    ax.set_yticks(range(0, 101, 20))


def _bar_text(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.0f}"


def _categories(runs: list[dict]) -> list[str]:
    found = {c for b in _blocks(runs) for c in b.get("harmful", {}).get("by_category", {})}
    known = [c for c in CATEGORIES if c in found]
    return known + sorted(found - set(known))


def _category_asr(cat: str) -> Callable[[dict], Measure | None]:
    def get(block: dict) -> Measure | None:
        c = block.get("harmful", {}).get("by_category", {}).get(cat)
        return Measure(c["asr"], c["total"], c["jailbroken"]) if c else None

    return get


def plot_asr_by_category(results: dict, path: str | Path) -> Path | None:
    """Heat map of per-category ASR: rows arm × condition, one column per harm category.

    Returns:
        The path, or None (nothing written) when no generation carried a category.
    """
    import matplotlib
    from matplotlib.figure import Figure

    runs, arms = _runs(results), list(results["arms"])
    cats = _categories(runs)
    if not cats:
        return None
    labels, grid = [], []
    for arm in arms:
        for cond in CONDITIONS:
            labels.append(f"{ARM_LABELS.get(arm, arm)} · {COND_LABELS[cond]}")
            grid.append([_stats(runs, arm, cond, _category_asr(cat))[0] for cat in cats])
    fig = Figure(figsize=(10, 1.9 + 0.42 * len(labels)), dpi=110)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#eeeeee")
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            text, color = ("–", "#555555") if math.isnan(v) else (f"{v:.0f}", _ink(v))
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    for i in range(2, len(labels), 2):
        ax.axhline(i - 0.5, color="white", linewidth=3)
    ax.set_xticks(range(len(cats)), [c.replace("_", " ") for c in cats], rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.tick_params(labelsize=8, length=0)
    sizes = {
        c["total"]
        for b in _blocks(runs)
        for c in b.get("harmful", {}).get("by_category", {}).values()
    }
    n = f" (n = {sizes.pop()} per cell)" if len(sizes) == 1 else ""
    seeds = f", mean over {len(runs)} seeds" if len(runs) > 1 else ""
    ax.set_title(f"ASR (%) by harm category{n}{seeds}", fontsize=10)
    fig.colorbar(im, ax=ax, label="ASR (%)", fraction=0.03)
    fig.tight_layout()
    return _save(fig, Path(path))


def _ink(value: float) -> str:
    return "white" if value > 60 else "black"


def _benign_kinds(runs: list[dict]) -> list[str]:
    found = {k for b in _blocks(runs) for k in b.get("benign", {}).get("by_kind", {})}
    return [k for k in ("plain", "alarming") if k in found] + sorted(found - {"plain", "alarming"})


def plot_over_refusal(results: dict, path: str | Path) -> Path | None:
    """Bars of the benign refusal rate per arm and condition, split by prompt kind if known.

    Returns:
        The path, or None (nothing written) when the run has no benign set.
    """
    from matplotlib.figure import Figure

    runs, arms = _runs(results), list(results["arms"])
    if not any("benign" in b for b in _blocks(runs)):
        return None
    kinds = _benign_kinds(runs) or [None]
    series = [(cond, kind) for cond in CONDITIONS for kind in kinds]
    width = 0.8 / len(series)
    fig = Figure(figsize=(8, 3.8), dpi=110)
    ax = fig.subplots()
    for k, (cond, kind) in enumerate(series):

        def get(block, kind=kind):
            b = block.get("benign")
            b = b and (b.get("by_kind", {}).get(kind) if kind else b)
            return Measure(b["refusal_rate"], b["total"], b["refused"]) if b else None

        stats = [_stats(runs, arm, cond, get) for arm in arms]
        label = COND_LABELS[cond] + (f" · {kind} prompts" if kind else "")
        bars = ax.bar(
            [i - 0.4 + width * (k + 0.5) for i in range(len(arms))],
            [s[0] for s in stats],
            width,
            yerr=[s[1] for s in stats] if len(runs) > 1 else None,
            capsize=2,
            label=label,
            color=COND_COLORS[cond],
            alpha=1.0 if kinds.index(kind) == 0 else 0.55,
            hatch="" if kinds.index(kind) == 0 else "//",
            edgecolor="white",
        )
        ax.bar_label(bars, [_bar_text(s[0]) for s in stats], fontsize=7, padding=2)
    ax.set_xticks(range(len(arms)), [ARM_LABELS.get(a, a) for a in arms])
    ax.set_ylabel("benign prompts refused (%)")
    _percent_axis(ax)
    n = _first_total(runs, arms, _refusals)
    size = f" (n = {n})" if n else ""
    ax.set_title(f"Over-refusal on benign prompts{size}", fontsize=10)
    ax.legend(frameon=False, fontsize=8, ncols=2, loc="upper center")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, Path(path))


def write_plots(results: dict, run_dir: str | Path) -> dict[str, Path]:
    """Write the plots whose data is present; remove stale ones whose data is not.

    Returns:
        ``{file name: path}`` of the plots written.
    """
    run_dir = Path(run_dir)
    makers = (plot_asr, plot_asr_by_category, plot_over_refusal)
    written = {}
    for name, make in zip(PLOTS, makers, strict=True):
        path = make(results, run_dir / name)
        if path is None:
            (run_dir / name).unlink(missing_ok=True)
        else:
            written[name] = path
    return written
