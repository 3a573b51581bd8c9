"""Dataset loader for the ``backdooralign_mini`` lm-eval task (a local JSONL, no download)."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_mini(**_metadata):
    """The task's JSONL as a ``DatasetDict`` with one ``test`` split."""
    import datasets

    lines = (HERE / "backdooralign_mini.jsonl").read_text(encoding="utf-8").split("\n")
    rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
