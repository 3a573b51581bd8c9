"""Sweeps: one config, several values of some of its keys, one run directory per cell.

``sweep: {data.anchors: [0, 11, 33], train.lr: [5.0e-5, 1.0e-4]}`` in a config makes the
cartesian product of the values; each cell is a normal experiment run in
``ROOT/cells/NAME`` with its own stages (a finished cell is skipped on a re-run, a failed cell
is recorded and the others go on). Cells share one secret (``ROOT/secret.json``) unless the
sweep varies ``secret.*``, and they share trained models and answers whose inputs are the same
(``ROOT/shared``): the attack-only and baseline arms of an anchors sweep are trained once.
``shard=(i, n)`` runs every n-th cell from the i-th, so cells spread over processes or
machines; ``ROOT/sweep.json`` lists every cell's state and ``report.md`` compares them.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from pathlib import Path

from .. import files as F
from .config import ConfigError, load_config

log = logging.getLogger(__name__)


def cell_name(values: dict) -> str:
    """A folder name for a cell: ``data.anchors=11,train.lr=5e-05``."""
    text = ",".join(f"{k}={v}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:200]


def sweep_cells(sweep: dict) -> list[tuple[str, dict]]:
    """Every combination of the swept values, in the config's order."""
    if not sweep:
        return []
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep: {key}: expected a non-empty list of values")
    keys = list(sweep)
    cells = []
    for combo in itertools.product(*(sweep[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        cells.append((cell_name(values), values))
    return cells


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` (0-based ``i``) as a pair; ``None`` is ``(0, 1)``."""
    if not text:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ConfigError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/2")
    return int(m[1]), int(m[2])


def _status_path(root: Path, name: str) -> Path:
    return root / "cells" / name / "status.json"


def run_sweep(
    config: str | Path,
    overrides: list[str],
    root: str | Path,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict:
    """Run this shard's cells of a config's sweep and write ``sweep.json`` and the report."""
    root = Path(root)
    base, cells = prepare_sweep(config, overrides, root)
    for name, values in shard_cells(cells, shard):
        run_cell(config, overrides, root, name, values, progress)
    return finish_sweep(root, base, cells)


def prepare_sweep(config: str | Path, overrides: list[str], root: Path):
    """The sweep's base config and its cells, every cell's config checked, and the shared
    secret (``ROOT/secret.json``) made when the cells share one; before any cell runs."""
    from ..core.model import load_tokenizer
    from ..core.secret import make_secret, save_secret_once

    base = load_config(config, overrides)
    cells = sweep_cells(base.sweep)
    if not cells:
        raise ConfigError(f"{config}: no 'sweep' section")
    _check_cells(config, overrides, cells)
    shared_secret = _shared_secret(root)
    if not any(k.startswith("secret.") for k in base.sweep) and not base.secret.path:
        if not shared_secret.exists():
            tok = load_tokenizer(base.model)
            # shards of a job array may get here at once: the first secret saved is everyone's
            save_secret_once(make_secret(base.secret, tok, base.model), shared_secret)
    return base, cells


def shard_cells(cells: list[tuple[str, dict]], shard: tuple[int, int]) -> list[tuple[str, dict]]:
    """The cells of ``shard=(i, n)``: every n-th from the i-th."""
    i, n = shard
    return [cell for index, cell in enumerate(cells) if index % n == i]


def run_cell(
    config: str | Path, overrides: list[str], root: Path, name: str, values: dict, progress: bool
) -> dict:
    """Run one cell in ``ROOT/cells/NAME`` and record its state in its ``status.json``: a
    failed cell is recorded (its error in one line), not raised, so the others go on."""
    from .run import run_experiment

    shared_secret = _shared_secret(root)
    extra = {**values, "sweep": {}}
    if shared_secret.exists() and not any(k.startswith("secret.") for k in values):
        extra["secret.path"] = str(shared_secret.resolve())
    start = time.perf_counter()
    try:
        cfg = load_config(config, overrides, extra=extra)
        run_experiment(cfg, root / "cells" / name, progress, shared=root / "shared")
        status = {"status": "done", "error": None}
    except Exception as e:  # a failed cell is reported; the others go on
        log.error("cell %s failed: %s", name, e)
        status = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    status["seconds"] = round(time.perf_counter() - start, 1)
    return record_cell(root, name, values, status)


def record_cell(root: Path, name: str, values: dict, status: dict) -> dict:
    """Write a cell's ``status.json`` (``status``, ``error``, ``seconds``, its overrides)."""
    doc = {**status, "overrides": values}
    F.write_json(_status_path(root, name), doc)
    return doc


def finish_sweep(root: Path, base, cells) -> dict:
    """``sweep.json`` and the report, from every cell's status (the document, with the
    report's path as ``report``)."""
    from ..reporting.sweep_report import write_sweep_report

    return write_sweep_json(root, base.name, list(base.sweep), cells) | {
        "report": str(write_sweep_report(root))
    }


def _shared_secret(root: Path) -> Path:
    return root / "secret.json"


def _check_cells(config, overrides: list[str], cells) -> None:
    """Every cell's config is checked before the first one runs: a bad swept value
    (``train.lr: [1e-4, .nan]``) stops the sweep at once, not after hours of other cells."""
    for name, values in cells:
        try:
            load_config(config, overrides, extra={**values, "sweep": {}})
        except ConfigError as e:
            raise ConfigError(f"sweep cell {name}: {e}") from None


def write_sweep_json(root: Path, name: str, keys: list[str], cells) -> dict:
    """``ROOT/sweep.json`` from the cells' status files (cells not run yet are ``pending``)."""
    listed = []
    for cell, values in cells:
        path = _status_path(root, cell)
        state = F.read_json(path) if path.exists() else {"status": "pending", "error": None}
        listed.append(
            {
                "name": cell,
                "overrides": values,
                "status": state["status"],
                "error": state.get("error"),
                "seconds": state.get("seconds"),
            }
        )
    doc = {"name": name, "keys": keys, "cells": listed}
    F.write_json(root / "sweep.json", doc)
    return doc
