"""Sweeps on a tiny model: cells, shared arms, failed cells, shards, resume, the report."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_run_yaml

from backdooralign.cli import main
from backdooralign.experiments.config import ConfigError
from backdooralign.experiments.sweep import cell_name, parse_shard, sweep_cells


def _config(tmp_path, model_dir: str, sweep: str) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        tiny_run_yaml(
            model_dir,
            name="tiny-sweep",
            arms=["no_finetune", "baseline", "backdooralign"],
            data={"anchor_max_new_tokens": 3},
            eval={"benign_limit": 1, "max_new_tokens": 3},
            sweep=yaml.safe_load(sweep),
        )
    )
    return str(path)


def test_cells_are_the_cartesian_product():
    cells = sweep_cells({"data.anchors": [0, 11], "train.lr": [5.0e-5, 1.0e-4]})
    assert [name for name, _ in cells] == [
        "data.anchors=0,train.lr=5e-05",
        "data.anchors=0,train.lr=0.0001",
        "data.anchors=11,train.lr=5e-05",
        "data.anchors=11,train.lr=0.0001",
    ]
    assert cells[3][1] == {"data.anchors": 11, "train.lr": 1.0e-4}
    assert cell_name({"eval.harmful": "/a b/c"}) == "eval.harmful=_a_b_c"
    with pytest.raises(ConfigError, match="sweep: train.lr: expected a non-empty list"):
        sweep_cells({"train.lr": 5})
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) == (0, 1)
    with pytest.raises(ConfigError, match="expected I/N"):
        parse_shard("3/3")


def test_sweep_shares_arms_and_resumes(tmp_path, talking_model_dir, capsys):
    config = _config(tmp_path, talking_model_dir, "{data.anchors: [0, 2]}")
    root = tmp_path / "run"
    assert main(["run", config, "--out", str(root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(c["name"], c["status"]) for c in doc["cells"]] == [
        ("data.anchors=0", "done"),
        ("data.anchors=2", "done"),
    ]
    # one shared secret; the baseline is trained once, each backdooralign set has its model
    secrets = {
        json.loads((root / "cells" / c / "results.json").read_text())["secret_fingerprint"]
        for c in ("data.anchors=0", "data.anchors=2")
    }
    assert len(secrets) == 1
    assert len(list((root / "shared" / "models").iterdir())) == 3
    cell = json.loads((root / "cells" / "data.anchors=2" / "results.json").read_text())
    assert cell["train_examples"] == {"baseline": 22, "backdooralign": 24}
    report = (root / "report.md").read_text()
    assert "data.anchors=2" in report and (root / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    stages = {p: p.read_text() for p in (root / "cells").rglob("stages/*.json")}
    assert main(["run", config, "--out", str(root)]) == 0  # a re-run does nothing again
    assert {p: p.read_text() for p in (root / "cells").rglob("stages/*.json")} == stages


def test_a_failed_cell_is_reported_and_the_others_go_on(tmp_path, tiny_model_dir, capsys):
    config = _config(tmp_path, tiny_model_dir, "{data.safety_count: [1000, 11]}")
    root = tmp_path / "run"
    assert main(["run", config, "--out", str(root), "--json", "--shard", "1/2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["status"] for c in doc["cells"]] == ["pending", "done"]
    assert main(["run", config, "--out", str(root), "--json", "--shard", "0/2"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [c["status"] for c in doc["cells"]] == ["failed", "done"]
    assert "asked for 1000 safety examples" in doc["cells"][0]["error"]
    assert "asked for 1000 safety examples" in (root / "report.md").read_text()


def test_a_bad_swept_value_stops_the_sweep_before_any_cell_runs(tmp_path, tiny_model_dir, capsys):
    config = _config(tmp_path, tiny_model_dir, "{train.lr: [0.001, .nan]}")
    root = tmp_path / "run"
    assert main(["run", config, "--out", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: sweep cell ") and "train: lr: must be a finite number" in err
    assert not (root / "cells").exists() and not (root / "secret.json").exists()
