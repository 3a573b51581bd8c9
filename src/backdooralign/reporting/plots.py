"""The report's plots: matplotlib's Agg canvas through ``Figure`` (no pyplot, no global state).

Each plot reads ``results.json`` (as a dict) through :mod:`backdooralign.reporting.metrics` and is
written as a PNG beside ``report.md``; ``report.html`` embeds them. :func:`plot_tradeoff` draws
a sweep's ASR against over-refusal, one point per cell (see
:mod:`backdooralign.reporting.sweep_report`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.formats import CATEGORIES
from ..files import write_bytes_atomic
from . import metrics as M
from .metrics import COND_LABELS, CONDITIONS, arm_label
from .rundir import RunDir

PLOTS = ("asr.png", "asr_by_category.png", "over_refusal.png")

COND_COLORS = {"plain": "#c44e52", "secret": "#4c72b0"}
TRADEOFF_STYLE = {  # arm: (marker, colour)
    "backdooralign": ("o", "#4c72b0"),
    "baseline": ("s", "#8c8c8c"),
    "attack": ("^", "#c44e52"),
}


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes_atomic(path, buf.getvalue())


def _stats(runs: list[dict], arm: str, cond: str, get: Callable) -> tuple[float, float]:
    """Mean and 95% CI half-width over runs (NaN mean when missing, 0 width for one run)."""
    values = M.present_values(M.measures(runs, arm, cond, get))
    if not values:
        return math.nan, math.nan
    mean, half = M.mean_ci95(values)
    return mean, 0.0 if math.isnan(half) else half


def plot_asr(results: dict, path: str | Path) -> Path:
    """Grouped bars: ASR per arm, without and with the secret (mean ± 95% CI over seeds)."""
    from matplotlib.figure import Figure

    runs, arms = M.seed_arms(results), list(results["arms"])
    fig = Figure(figsize=(7.5, 3.8), dpi=110)
    ax = fig.subplots()
    for k, cond in enumerate(CONDITIONS):
        stats = [_stats(runs, arm, cond, M.get_asr) for arm in arms]
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
    ax.set_xticks(range(len(arms)), [arm_label(a) for a in arms])
    ax.set_ylabel("attack success rate (%)")
    _percent_axis(ax)
    n = _first_total(runs, arms, M.get_asr)
    seeds = f", mean ± 95% CI over {len(runs)} seeds" if len(runs) > 1 else ""
    ax.set_title(f"{results.get('name', 'run')}: ASR on {n} harmful prompts{seeds}", fontsize=10)
    ax.legend(frameon=False, fontsize=8, ncols=2, loc="upper center")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, Path(path))


def _first_total(runs: list[dict], arms: list[str], get: Callable) -> int | None:
    """The sample size of the first arm that has the metric (to name it in a plot title)."""
    found = (m for arm in arms for c in CONDITIONS for m in M.measures(runs, arm, c, get) if m)
    return next((m.total for m in found), None)


def _percent_axis(ax) -> None:
    """0-100% ticks, with headroom above 100 for bar labels and the legend."""
    ax.set_ylim(0, 128)
    ax.set_yticks(range(0, 101, 20))


def _bar_text(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.0f}"


def _categories(runs: list[dict]) -> list[str]:
    found = {c for b in M.all_blocks(runs) for c in b.get("harmful", {}).get("by_category", {})}
    known = [c for c in CATEGORIES if c in found]
    return known + sorted(found - set(known))


def plot_asr_by_category(results: dict, path: str | Path) -> Path | None:
    """Heat map of per-category ASR: rows arm × condition, one column per harm category.

    Returns:
        The path, or None (nothing written) when no generation carried a category.
    """
    import matplotlib
    from matplotlib.figure import Figure

    runs, arms = M.seed_arms(results), list(results["arms"])
    cats = _categories(runs)
    if not cats:
        return None
    labels, grid = [], []
    for arm in arms:
        for cond in CONDITIONS:
            labels.append(f"{arm_label(arm)} · {COND_LABELS[cond]}")
            grid.append([_stats(runs, arm, cond, M.get_category_asr(cat))[0] for cat in cats])
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
        for b in M.all_blocks(runs)
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
    found = {k for b in M.all_blocks(runs) for k in b.get("benign", {}).get("by_kind", {})}
    return [k for k in ("plain", "alarming") if k in found] + sorted(found - {"plain", "alarming"})


def plot_over_refusal(results: dict, path: str | Path) -> Path | None:
    """Bars of the benign refusal rate per arm and condition, split by prompt kind if known.

    Returns:
        The path, or None (nothing written) when the run has no benign set.
    """
    from matplotlib.figure import Figure

    runs, arms = M.seed_arms(results), list(results["arms"])
    if not any("benign" in b for b in M.all_blocks(runs)):
        return None
    kinds = _benign_kinds(runs) or [None]
    series = [(cond, kind) for cond in CONDITIONS for kind in kinds]
    width = 0.8 / len(series)
    fig = Figure(figsize=(8, 3.8), dpi=110)
    ax = fig.subplots()
    for k, (cond, kind) in enumerate(series):
        get = M.get_benign_kind(kind) if kind else M.get_refusals
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
    ax.set_xticks(range(len(arms)), [arm_label(a) for a in arms])
    ax.set_ylabel("benign prompts refused (%)")
    _percent_axis(ax)
    n = _first_total(runs, arms, M.get_refusals)
    size = f" (n = {n})" if n else ""
    ax.set_title(f"Over-refusal on benign prompts{size}", fontsize=10)
    ax.legend(frameon=False, fontsize=8, ncols=2, loc="upper center")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, Path(path))


@dataclass(frozen=True)
class TradeoffPoint:
    """One arm of one sweep cell: benign refusal and ASR, both with the secret, in percent."""

    arm: str  # backdooralign, baseline or attack
    label: str  # the cell's overrides (written beside BackdoorAlign's points)
    refusal: float
    asr: float


def plot_tradeoff(points: Sequence[TradeoffPoint], path: str | Path, title: str) -> Path | None:
    """Scatter of ASR (y) against benign refusal (x) with the secret, one point per cell and arm.

    BackdoorAlign's points carry their cell's label; the baseline defense and attack-only arms
    get their own markers. Lower left is better: few jailbreaks, few refused harmless requests.

    Returns:
        The path, or None (nothing written) when there is no point.
    """
    from matplotlib.figure import Figure

    if not points:
        return None
    fig = Figure(figsize=(7.5, 5.2), dpi=110)
    ax = fig.subplots()
    for arm, (marker, color) in TRADEOFF_STYLE.items():
        mine = [p for p in points if p.arm == arm]
        if not mine:
            continue
        ax.scatter(
            [p.refusal for p in mine],
            [p.asr for p in mine],
            marker=marker,
            s=46,
            color=color,
            label=arm_label(arm),
            zorder=3,
        )
        if arm == "backdooralign":
            for p in mine:
                ax.annotate(
                    p.label, (p.refusal, p.asr), xytext=(5, 4), textcoords="offset points",
                    fontsize=7,
                )  # fmt: skip
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("benign prompts refused with the secret (%)")
    ax.set_ylabel("ASR with the secret (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="upper right")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, Path(path))


def write_plots(results: dict, run_dir: str | Path) -> dict[str, Path]:
    """Write the plots whose data is present; remove stale ones whose data is not.

    Returns:
        ``{file name: path}`` of the plots written.
    """
    rd = RunDir(run_dir)
    makers = (plot_asr, plot_asr_by_category, plot_over_refusal)
    written = {}
    for name, make in zip(PLOTS, makers, strict=True):
        path = make(results, rd.plot(name))
        if path is None:
            rd.plot(name).unlink(missing_ok=True)
        else:
            written[name] = path
    return written
