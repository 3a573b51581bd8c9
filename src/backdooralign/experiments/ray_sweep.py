"""Sweeps on a Ray cluster: each cell of a sweep is a Ray task.

:func:`run_sweep_ray` does what :func:`sweep.run_sweep` does (every cell's config checked and
the shared secret made before any cell runs; ``sweep.json`` and the report at the end), but
runs the cells as Ray tasks, as many at once as the cluster has room for (each asks for
``num_cpus`` and ``num_gpus``). Cells share models and answers through ``ROOT/shared`` as on one
machine: a cell that needs a model another cell is training waits for it (a file lock beside
the model) and then reuses it, so nothing is trained twice. A failed cell is reported (its
error, or Ray's when its worker died) and the others go on.

Every node needs backdooralign installed, and ROOT, the config and its inputs at the same
paths (a shared filesystem whose locks work across nodes: NFS, or Lustre mounted with
``flock``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..ray_cluster import connect
from .sweep import finish_sweep, prepare_sweep, record_cell, run_cell, shard_cells

log = logging.getLogger(__name__)


def run_sweep_ray(
    config: str | Path,
    overrides: list[str],
    root: str | Path,
    shard: tuple[int, int] = (0, 1),
    num_cpus: float = 1,
    num_gpus: float = 0,
    address: str | None = None,
) -> dict:
    """Run this shard's cells of a config's sweep as Ray tasks, each asking for ``num_cpus``
    CPUs and ``num_gpus`` GPUs; writes ``sweep.json`` and the report once all have ended."""
    ray = connect(address)
    config, root = Path(config).resolve(), Path(root).resolve()  # the same on every node
    base, cells = prepare_sweep(config, overrides, root)
    task = ray.remote(run_cell).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
    running = {
        task.remote(config, list(overrides), root, name, values, False): (name, values)
        for name, values in shard_cells(cells, shard)
    }
    pending = list(running)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        name, values = running[done[0]]
        try:
            status = ray.get(done[0])
        except ray.exceptions.RayError as e:  # the task itself failed: its worker died, ...
            error = f"{type(e).__name__}: the Ray task of this cell failed"
            log.error("cell %s: %s", name, error)
            status = record_cell(root, name, values, {"status": "failed", "error": error})
        log.info("cell %s: %s (%d running)", name, status["status"], len(pending))
    return finish_sweep(root, base, cells)
