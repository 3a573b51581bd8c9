"""Resumable stages: a stage whose inputs did not change is skipped on a re-run."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from .files import write_json
from .rundir import RunDir

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
