"""The layout of a run directory, in one place.

Every stage, the report and the plots find their files through :class:`RunDir`::

    config.yaml                 resolved config (no secret in it)
    secret.json                 mode 0600, when the config generates the secret
    data/ARM.jsonl              mixed training sets (backdooralign's is mode 0600)
    data/ARM.manifest.json      what each was built from (inputs' sha256, counts, screening)
    models/ARM/                 fine-tuned models with train_metrics.json
    gens/ARM.SET.COND.jsonl     generations (COND: plain | secret)
    scores/ARM.KIND.COND.json   judge and lm-eval scores (need a server or a model)
    stages/NAME.json            finished stages: input key, seconds, info
    judge-cache.jsonl           the judge's cached replies
    seeds/seed-N/               further seeds of a multi-seed run (same layout)
    cells/NAME/                 cells of a sweep (same layout)
    results.json, report.md, report.html, *.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.mixing import manifest_path

CONDITIONS = ("plain", "secret")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (nothing is created until a stage writes)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def secret(self) -> Path:
        return self.root / "secret.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def judge_cache(self) -> Path:
        return self.root / "judge-cache.jsonl"

    def training_set(self, arm: str) -> Path:
        return self.root / "data" / f"{arm}.jsonl"

    def manifest(self, arm: str) -> Path:
        return manifest_path(self.training_set(arm))

    def model(self, arm: str) -> Path:
        return self.root / "models" / arm

    def gens(self, arm: str, eval_set: str, cond: str) -> Path:
        return self.root / "gens" / f"{arm}.{eval_set}.{cond}.jsonl"

    def score(self, arm: str, kind: str, cond: str, ext: str = "json") -> Path:
        return self.root / "scores" / f"{arm}.{kind}.{cond}.{ext}"

    def stage(self, name: str) -> Path:
        return self.root / "stages" / f"{name}.json"

    def plot(self, name: str) -> Path:
        return self.root / name

    def seed_run(self, seed: int) -> RunDir:
        return RunDir(self.root / "seeds" / f"seed-{seed}")

    def cell(self, name: str) -> RunDir:
        return RunDir(self.root / "cells" / name)
