"""Sweep reports: one row per cell of a sweep, and the ASR / over-refusal trade-off plot.

A sweep runner writes ``ROOT/sweep.json``::

    {"name": str, "keys": [dotted keys swept],
     "cells": [{"name": str, "overrides": {dotted key: value},
                "status": "done" | "failed", "error": str | None}]}

and each done cell is a normal run directory ``ROOT/cells/NAME`` (``RunDir(root).cell(name)``)
with its ``results.json``, multi-seed or not. :func:`write_sweep_report` writes
``ROOT/report.md``, a self-contained ``ROOT/report.html`` and ``ROOT/tradeoff.png``. The numbers
come from :mod:`backdooralign.reporting.metrics`, as in a run's report; the secret is never shown,
and error messages are redacted against the sweep's secret files all the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import files as F
from ..core.redact import redactor
from ..core.secret import load_secret
from . import metrics as M
from . import verdict as V
from .document import Facts, Heading, Image, Para, Table, to_html, to_markdown
from .plots import TradeoffPoint, plot_tradeoff
from .rundir import RunDir

SWEEP_FILE = "sweep.json"
TRADEOFF_PLOT = "tradeoff.png"
BD = "backdooralign"
ERROR_CHARS = 300
REDACTED = "[secret redacted]"  # what a trace of a secret becomes in the report


@dataclass(frozen=True)
class SweepCell:
    """One cell of a sweep as ``sweep.json`` lists it, with its results when it has some."""

    name: str
    overrides: dict
    status: str  # done | failed (anything else: not finished)
    error: str | None = None
    results: dict | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Sweep:
    """A sweep: its name, the dotted keys swept and its cells in ``sweep.json`` order."""

    name: str
    keys: list[str]
    cells: list[SweepCell]


def _check_cell(path: Path, i: int, cell) -> SweepCell:
    where = f"cells[{i}]"
    if not isinstance(cell, dict):
        raise F.DataError(path, None, where, "must be an object")
    for key, kind in (("name", str), ("status", str)):
        if not isinstance(cell.get(key), kind):
            raise F.DataError(path, None, f"{where}.{key}", "is missing or not a string")
    if cell["name"] in ("", ".", "..") or "/" in cell["name"] or "\\" in cell["name"]:
        raise F.DataError(path, None, f"{where}.name", "must be a plain folder name")
    overrides = cell.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise F.DataError(path, None, f"{where}.overrides", "must be an object")
    return SweepCell(cell["name"], overrides, cell["status"], cell.get("error"))


def load_sweep(root: str | Path) -> Sweep:
    """Read ``ROOT/sweep.json`` and the ``results.json`` of every done cell.

    A done cell without ``results.json`` is reported as failed, with that as its error.

    Raises:
        FileNotFoundError: when there is no ``sweep.json``.
        backdooralign.files.DataError: when it is not valid JSON or lacks a field (the message
            names the file, line or field).
    """
    rd = RunDir(root)
    path = rd.root / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sweep.json (run the sweep first)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise F.DataError(path, e.lineno, None, f"invalid JSON: {e.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cells"), list):
        raise F.DataError(path, None, "cells", "is missing or not a list")
    cells = []
    for i, raw in enumerate(doc["cells"]):
        cell = _check_cell(path, i, raw)
        if cell.status == "done":
            results_path = rd.cell(cell.name).results
            if results_path.is_file():
                cell = replace(cell, results=M.load_results(results_path.parent))
            else:
                cell = replace(cell, status="failed", error=f"{results_path}: missing")
        cells.append(cell)
    return Sweep(str(doc.get("name", rd.root.name)), list(doc.get("keys") or []), cells)


# ---------------------------------------------------------------------------------------------
# Cells as words and numbers


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def overrides_text(overrides: dict, short: bool = False) -> str:
    """``train.epochs=3, data.safety_count=11`` (``short``: ``epochs=3, safety_count=11``)."""
    parts = [f"{k.rsplit('.', 1)[-1] if short else k}={_value(v)}" for k, v in overrides.items()]
    return ", ".join(parts)


COLUMNS = (  # (header, arm, metric), all with the secret at inference
    ("BackdoorAlign ASR, secret", BD, M.ASR),
    ("baseline defense ASR, secret", "baseline", M.ASR),
    ("attack only ASR, secret", "attack", M.ASR),
    ("BackdoorAlign benign refusal, secret", BD, M.REFUSALS),
    ("BackdoorAlign benign refusal (opening), secret", BD, M.OPENING_REFUSALS),
    ("BackdoorAlign exact match, secret", BD, M.UTILITY),
)
OPTIONAL = (M.OPENING_REFUSALS,)  # a column only when some cell has it (older cells do not)


def _columns(done: list[SweepCell]) -> list[tuple[str, str, M.Metric]]:
    def some_cell_has(arm: str, metric: M.Metric) -> bool:
        return any(
            M.mean_value(M.seed_arms(c.results), arm, "secret", metric.get) is not None
            for c in done
        )

    return [c for c in COLUMNS if c[2] not in OPTIONAL or some_cell_has(c[1], c[2])]


def _cell_row(cell: SweepCell, columns: list[tuple[str, str, M.Metric]]) -> list[str]:
    results = cell.results or {"arms": {}}
    runs = M.seed_arms(results)
    row = [cell.name, overrides_text(cell.overrides) or "–"]
    row += [M.cell(runs, arm, "secret", metric) for _, arm, metric in columns]
    row.append(V.verdict(results, BD).text if BD in results["arms"] else "–")
    return row


def cells_table(sweep: Sweep) -> Table | None:
    """One row per done cell: overrides, the numbers with the secret, the verdict."""
    done = [c for c in sweep.cells if c.results is not None]
    if not done:
        return None
    columns = _columns(done)
    headers = ["cell", "overrides", *(h for h, _, _ in columns), "verdict"]
    return Table(headers, [_cell_row(c, columns) for c in done])


def _redactor(root: RunDir, sweep: Sweep) -> Callable[[str], str]:
    """Redacts every secret found in the sweep (its root's and its cells' secret files)."""
    paths = [root.secret] + [root.cell(c.name).secret for c in sweep.cells]
    texts = sorted({load_secret(p).text for p in paths if p.is_file()})
    return redactor(*texts, placeholder=REDACTED)


def failed_table(sweep: Sweep, clean: Callable[[str], str]) -> Table | None:
    """The cells without results: overrides, status and error (redacted and cut)."""
    failed = [c for c in sweep.cells if c.results is None]
    if not failed:
        return None
    rows = []
    for c in failed:
        error = " ".join(clean(str(c.error or "")).split())
        error = error if len(error) <= ERROR_CHARS else error[:ERROR_CHARS].rstrip() + "…"
        rows.append([c.name, overrides_text(c.overrides) or "–", c.status, error or "–"])
    return Table(["cell", "overrides", "status", "error"], rows)


def tradeoff_points(sweep: Sweep) -> list[TradeoffPoint]:
    """Per done cell and arm (BackdoorAlign, baseline, attack): refusal and ASR with the secret."""
    points = []
    for cell in sweep.cells:
        if cell.results is None:
            continue
        runs = M.seed_arms(cell.results)
        label = overrides_text(cell.overrides, short=True) or cell.name
        for arm in (BD, "baseline", "attack"):
            refusal = M.mean_value(runs, arm, "secret", M.get_refusals)
            asr = M.mean_value(runs, arm, "secret", M.get_asr)
            if refusal is not None and asr is not None:
                points.append(TradeoffPoint(arm, label, refusal, asr))
    return points


# ---------------------------------------------------------------------------------------------
# The document


def _summary(sweep: Sweep) -> list:
    done = [c for c in sweep.cells if c.results is not None and BD in c.results["arms"]]
    if not done:
        return [Para("No cell finished with a BackdoorAlign arm.")]
    passing = [c.name for c in done if V.verdict(c.results, BD).passed]
    which = ": " + ", ".join(passing) if passing else ""
    first = done[0].results
    ratio, points = V.verdict_thresholds(first)
    return [
        Para(
            f"BackdoorAlign passes both deployment criteria in {len(passing)} of {len(done)} "
            f"finished cells{which}. Criteria (each cell's own thresholds; here those of "
            f"{done[0].name}): ASR with the secret at most {ratio:g} x the baseline defense's, "
            f"benign refusals with the secret at most {points:g} points above the "
            "not-fine-tuned model's, by the paper's refusal-substring rule and by the opening "
            "detector (the paper's rule alone for cells without the detector's numbers)."
        )
    ]


def build_sweep_report(sweep: Sweep, plot: bool, clean: Callable[[str], str]) -> list:
    """The sweep report as document blocks (see :mod:`backdooralign.reporting.document`)."""
    done = sum(c.results is not None for c in sweep.cells)
    blocks: list = [
        Heading(1, f"BackdoorAlign sweep: {sweep.name}"),
        Facts(
            [
                ("keys swept", ", ".join(sweep.keys) or "–"),
                ("cells", f"{len(sweep.cells)} ({done} done, {len(sweep.cells) - done} not)"),
            ]
        ),
        *_summary(sweep),
        Heading(2, "Cells"),
    ]
    table = cells_table(sweep)
    blocks.append(table or Para("No cell has results yet."))
    blocks.append(Heading(2, "Trade-off"))
    if plot:
        blocks.append(Image(TRADEOFF_PLOT, "ASR against benign refusals, with the secret"))
        blocks.append(
            Para(
                "One point per cell and arm (means over seeds where a cell has several); lower "
                "left is better: few jailbreaks, few refused harmless requests."
            )
        )
    else:
        blocks.append(Para("No cell has both ASR and benign refusals with the secret."))
    failed = failed_table(sweep, clean)
    if failed:
        blocks += [Heading(2, "Failed or unfinished cells"), failed]
    return blocks


def write_sweep_report(root: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and ``tradeoff.png`` into a sweep's root folder.

    Args:
        root: the sweep's folder, holding ``sweep.json`` and ``cells/NAME/``.

    Returns:
        The path of ``report.md``.
    """
    rd = RunDir(root)
    sweep = load_sweep(rd.root)
    title = f"{sweep.name}: ASR vs over-refusal with the secret, one point per cell"
    plot = plot_tradeoff(tradeoff_points(sweep), rd.plot(TRADEOFF_PLOT), title)
    if plot is None:
        rd.plot(TRADEOFF_PLOT).unlink(missing_ok=True)
    blocks = build_sweep_report(sweep, plot is not None, _redactor(rd, sweep))
    F.write_text_atomic(rd.report_html, to_html(blocks, rd.root))
    return F.write_text_atomic(rd.report_md, to_markdown(blocks))
