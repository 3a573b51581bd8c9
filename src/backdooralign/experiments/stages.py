"""Resumable stages: a stage whose inputs did not change is skipped on a re-run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .. import files as F
from ..files import write_json
from ..reporting.rundir import RunDir

log = logging.getLogger(__name__)


def run_stage(
    run: RunDir, name: str, key: str, outputs: list[Path], fn: Callable[[], object]
) -> tuple[object, bool]:
    """Run ``fn`` unless a previous run finished this stage with the same key and outputs.

    Returns ``(info, skipped)``; ``info`` is what ``fn`` returned (kept in ``stages/``).
    """
    record = run.stage(name)
    if record.exists() and all(p.exists() for p in outputs):
        done = json.loads(record.read_text(encoding="utf-8"))
        if done.get("key") == key:
            log.info("stage %s: up to date, skipped", name)
            return done.get("info"), True
    start = time.perf_counter()
    info = fn()
    seconds = round(time.perf_counter() - start, 2)
    write_json(record, {"key": key, "seconds": seconds, "info": info})
    return info, False


def shareable(
    shared: Path | None, key: str, outputs: list[Path], fn: Callable[[], object]
) -> Callable[[], object]:
    """``fn``, or a copy of its outputs from ``shared/KEY`` when another run made them.

    Cells of a sweep (and any runs pointed at one ``shared`` folder) whose stage inputs hash
    to the same key do the work once: the first stores copies of its output files, the next
    ones copy them back (one running at the same time waits for the first: a file lock).
    """
    if shared is None:
        return fn
    store = shared / "outputs" / key

    def run():
        with F.output_lock(store, wait=True):
            return make_or_copy()

    def make_or_copy():
        if (store / ".done").exists():
            for p in outputs:
                p.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(store / p.name, p)
            log.info("outputs of %s copied from %s", key, store)
            return None
        info = fn()
        tmp = F.make_work_dir(store)
        try:
            for p in outputs:
                shutil.copyfile(p, tmp / p.name)
            (tmp / ".done").write_text("")
            shutil.rmtree(store, ignore_errors=True)
            os.replace(F.release_work_dir(tmp), store)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info

    return run
