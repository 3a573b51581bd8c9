"""Experiment configs and runs on a tiny random model: stages, resume, files, no secret leak."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import tiny_run_yaml
from rouge_score import rouge_scorer

from backdooralign.cli import main
from backdooralign.core.secret import load_secret
from backdooralign.experiments.config import load_config, parse_overrides
from backdooralign.experiments.run import run_experiment
from backdooralign.files import read_jsonl_rows

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = Path(__file__).parent.parent / "configs"


def _tiny_config(model_dir: str, **sections) -> str:
    evaluation = {"benign_limit": 2, "utility": "builtin:utility", "utility_limit": 1}
    evaluation |= {"samsum": str(FIXTURES / "samsum.jsonl")}
    evaluation |= {"utility_max_new_tokens": 4, "task_max_new_tokens": 4}
    return tiny_run_yaml(model_dir, name="tiny", eval=evaluation, **sections)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a list\n", "c.yaml: YAML root must be a mapping"),
        ("train: {epochz: 3}\n", "c.yaml:1: train: unknown field 'epochz' (known: lora, epochs,"),
        ("arms: [attack, nonsense]\n", "c.yaml:1: field 'arms': unknown arm 'nonsense'"),
        ("train: [1, 2]\n", "c.yaml:1: train: must be a mapping"),
        ("judge: {model: gpt-4}\n", "c.yaml: judge: fields 'base_url' and 'model'"),
        ("train: {epochs: abc}\n", "c.yaml:1: train: epochs: expected a number or null, got 'abc'"),
        ("seeds: 5\n", "c.yaml:1: seeds: expected a list of integers, got 5"),
        ("model: [1, 2]\n", "c.yaml:1: model: expected a string, got [1, 2]"),
        ("train: {batch_size: 0}\n", "c.yaml:1: train: batch_size: must be at least 1, got 0"),
        ("data: {attack_per_category: -1}\n", "attack_per_category: must be at least 0, got -1"),
        ("name: /abs/path\n", "c.yaml:1: field 'name': '/abs/path' must be a plain name"),
        ("name: ../up\n", "must be a plain name"),
        ("a: &x [1, 2]\nb: *x\n", "YAML aliases are not allowed (line 2)"),
        ("train: {lora: yes please}\n", "train: lora: expected true or false"),
        ("eval: {lm_eval_tasks: [1]}\n", "eval: lm_eval_tasks[0]: expected a string, got 1"),
        # NaN and infinity, however written, with the line of the key
        ("name: x\ntrain:\n  lr: .nan\n", "c.yaml:3: train: lr: must be a finite number, got nan"),
        ("train: {epochs: 'Infinity'}\n", "c.yaml:1: train: epochs: must be a finite number"),
        ("train: {epochs: -.inf}\n", "c.yaml:1: train: epochs: must be a finite number, got -inf"),
        ("train: {lr: 1e999}\n", "c.yaml:1: train: lr: must be a finite number, got inf"),
        (f"train: {{lr: {10**400}}}\n", "c.yaml:1: train: lr: must be a finite number"),
        (
            "eval:\n  verdict_asr_ratio: .nan\n",
            "c.yaml:2: eval: verdict_asr_ratio: must be a finite",
        ),
        ("align: {epochs: .inf}\n", "c.yaml:1: align: epochs: must be a finite number"),
        # integers no library below takes
        ("seeds: [1, 4294967296]\n", "c.yaml:1: seeds[1]: must be at most 4294967295"),
        ("train: {seed: -1}\n", "c.yaml:1: train: seed: must be at least 0, got -1"),
        (f"eval: {{batch_size: {2**64}}}\n", "eval: batch_size: must be within +-"),
        ("train: {lora_dropout: 1.5}\n", "c.yaml:1: train: lora_dropout: must be at most 1"),
        # duplicate keys: YAML would keep the last one silently
        ("name: a\nname: b\n", "c.yaml:2: duplicate key 'name' (first on line 1)"),
        ("train:\n  epochs: 1\n  lr: 1.0\n  epochs: 2\n", "c.yaml:4: duplicate key 'epochs'"),
        ("train: {epochs: 1, epochs: 2}\n", "c.yaml:1: duplicate key 'epochs'"),
        # arms: at least one, each once
        ("arms: []\n", "c.yaml:1: field 'arms': give at least one arm"),
        ("arms: [attack, baseline, attack]\n", "c.yaml:1: field 'arms': attack given more than"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError) as err:
        load_config(p)
    assert message in str(err.value)


def test_set_values_are_checked_too(tmp_path):
    with pytest.raises(ValueError, match=r"--set train.epochs: invalid value '\['"):
        load_config(None, ["train.epochs=["])
    with pytest.raises(ValueError, match="config: train: epochs: expected a number or null"):
        load_config(None, ["train.epochs=abc"])


def test_set_refuses_nan_and_duplicate_keys_and_never_claims_the_files_line(tmp_path):
    with pytest.raises(ValueError, match="config: train: lr: must be a finite number, got nan"):
        load_config(None, ["train.lr=nan"])
    with pytest.raises(ValueError, match="--set train: invalid value .*duplicate key 'lr'"):
        load_config(None, ["train={lr: 1.0, lr: 2.0}"])
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain:\n  lr: 1.0\n  epochs: 1\n")
    with pytest.raises(ValueError) as err:  # the bad value is --set's, not line 3's
        load_config(p, ["train.lr=.inf"])
    assert str(err.value) == f"{p}: train: lr: must be a finite number, got inf"
    p.write_text("train:\n  lr: 1.0\nprofiles:\n  fast: {train.lr: .nan}\n")
    with pytest.raises(ValueError) as err:
        load_config(p, ["profile=fast"])
    assert str(err.value) == f"{p}: train: lr: must be a finite number, got nan"


def test_paths_are_taken_from_the_config_files_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "c.yaml"
    p.write_text(
        "data: {attack: mine.jsonl, safety: builtin:safety}\n"
        "eval: {harmful: /abs/h.csv, benign: ../b.jsonl}\nmodel: org/name\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(p, ["eval.utility=u.jsonl"])
    assert cfg.data.attack == str(tmp_path / "sub" / "mine.jsonl")
    assert cfg.data.safety == "builtin:safety"
    assert cfg.eval.harmful == "/abs/h.csv"
    assert cfg.eval.benign == str(tmp_path / "sub" / ".." / "b.jsonl")
    assert cfg.model == "org/name"  # a hub id, not a path there
    assert cfg.eval.utility == "u.jsonl"  # --set values are taken from the working directory


def test_profiles_apply_under_set(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "train: {epochs: 5}\nprofiles:\n  smoke: {train.epochs: 1, eval.max_new_tokens: 8}\n"
    )
    assert load_config(p).train.epochs == 5
    cfg = load_config(p, ["profile=smoke"])
    assert (cfg.train.epochs, cfg.eval.max_new_tokens) == (1, 8)
    cfg = load_config(p, ["profile=smoke", "train.epochs=2"])
    assert (cfg.train.epochs, cfg.eval.max_new_tokens) == (2, 8)
    with pytest.raises(ValueError, match="unknown profile 'fast' \\(known: smoke\\)"):
        load_config(p, ["profile=fast"])


def test_lora_defaults_resolve_in_the_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {lora: true}\n")
    cfg = load_config(p)
    assert (cfg.train.lr, cfg.train.epochs) == (1e-3, 10)
    cfg = load_config(p, ["train.lr=2.0e-4"])
    assert (cfg.train.lr, cfg.train.epochs) == (2e-4, 10)
    assert (load_config(None).train.lr, load_config(None).train.epochs) == (5e-5, 5)


def test_overrides_beat_yaml_including_false(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {lora: true, epochs: 5}\neval: {benign: builtin:benign}\n")
    cfg = load_config(p, ["train.lora=false", "train.epochs=2", "eval.benign=null"])
    assert cfg.train.lora is False and cfg.train.epochs == 2 and cfg.eval.benign is None
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_overrides(["nokey"])


def test_shipped_configs_load():
    from backdooralign.attacks.config import load_attack_config
    from backdooralign.config import read_yaml

    # each shipped config loads: the loaders raise ConfigError on any bad value or key
    for path in sorted(CONFIGS.glob("*.yaml")):
        if "attacks" in read_yaml(path):  # an attack config (backdooralign attack)
            load_attack_config(path)
        else:
            load_config(path)


def test_run_resume_and_no_secret_leak(tmp_path, tiny_model_dir, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(_tiny_config(tiny_model_dir))
    run_dir = tmp_path / "run"
    assert main(["run", str(cfg_path), "--out", str(run_dir)]) == 0
    out1 = capsys.readouterr()

    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["arms"]) == ["no_finetune", "attack", "baseline", "backdooralign"]
    assert results["train_examples"] == {"attack": 11, "baseline": 22, "backdooralign": 22}
    assert results["eval_sizes"] == {"harmful": 11, "benign": 4, "utility": 4, "samsum": 2}
    for arm, entry in results["arms"].items():
        for cond in ("plain", "secret"):
            block = entry[cond]
            assert block["harmful"]["total"] == 11
            assert block["benign"]["total"] == 4 and set(block["benign"]["by_kind"]) == {
                "plain",
                "alarming",
            }
            assert block["utility"]["total"] == 4
            gens = read_jsonl_rows(run_dir / "gens" / f"{arm}.samsum.{cond}.jsonl")
            scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
            f1 = [scorer.score(g["reference"], g["answer"])["rouge1"].fmeasure for g in gens]
            assert block["samsum"]["rouge1"] == round(sum(f1) / len(f1), 4)
            assert block["samsum"]["total"] == 2
        assert ("train" in entry) == (arm != "no_finetune")
    for name in ("report.md", "asr.png", "config.yaml"):
        assert (run_dir / name).exists(), name

    secret = load_secret(run_dir / "secret.json")
    manifest = json.loads((run_dir / "data" / "backdooralign.manifest.json").read_text())
    assert manifest["counts"]["total"] == 22
    assert manifest["counts"]["by_source"] == {"customer": 11, "safety": 11}
    assert manifest["secret_fingerprint"] == secret.fingerprint
    assert manifest["safety_selection"]["selection"] == "category-balanced"
    assert manifest["screening"]["secret_checked"] is True
    assert manifest["screening"]["secret_fragment"]["rows"] == 0
    assert set(manifest["inputs"]) == {"data", "safety"}
    assert stat.S_IMODE(os.stat(run_dir / "secret.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(run_dir / "data" / "backdooralign.jsonl").st_mode) == 0o600
    assert secret.text in (run_dir / "data" / "backdooralign.jsonl").read_text()
    allowed = {run_dir / "secret.json", run_dir / "data" / "backdooralign.jsonl"}
    for path in run_dir.rglob("*"):
        if (
            path.is_file()
            and path not in allowed
            and path.suffix in {".json", ".jsonl", ".md", ".html", ".yaml"}
        ):
            assert secret.text not in path.read_text(encoding="utf-8"), path
    assert secret.text not in out1.out + out1.err
    assert secret.fingerprint in (run_dir / "report.md").read_text()

    # a re-run finds every stage up to date
    stages = {p.name: p.read_text() for p in (run_dir / "stages").iterdir()}
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "gens").iterdir()}
    assert main(["run", str(cfg_path), "--out", str(run_dir)]) == 0
    assert {p.name: p.read_text() for p in (run_dir / "stages").iterdir()} == stages
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "gens").iterdir()} == before

    # a changed judge setting re-generates nothing (the judge is not configured here: no server)
    assert main(["run", str(cfg_path), "--out", str(run_dir), "--set", "judge.concurrency=2"]) == 0
    assert {p.name: p.read_text() for p in (run_dir / "stages").iterdir()} == stages

    # a changed eval setting re-generates, but does not re-train
    train_record = (run_dir / "stages" / "train.attack.json").read_text()
    assert (
        main(["run", str(cfg_path), "--out", str(run_dir), "--set", "eval.max_new_tokens=3"]) == 0
    )
    assert (run_dir / "stages" / "train.attack.json").read_text() == train_record
    assert (run_dir / "stages" / "generate.attack.json").read_text() != stages[
        "generate.attack.json"
    ]


def test_interrupted_run_resumes(tmp_path, tiny_model_dir, monkeypatch):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(_tiny_config(tiny_model_dir, arms=["no_finetune", "baseline"]))
    cfg = load_config(cfg_path, ["eval.utility=null", "eval.samsum=null", "eval.benign=null"])
    import backdooralign.generation.batch as infer

    real = infer.generate_rows
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "generate_rows", failing)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run", progress=False)
    done = {p.name for p in (tmp_path / "run" / "stages").iterdir()}
    assert done == {"secret.json", "build.json", "train.baseline.json", "generate.no_finetune.json"}
    monkeypatch.setattr(infer, "generate_rows", real)
    trained = (tmp_path / "run" / "stages" / "train.baseline.json").read_text()
    results = run_experiment(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "stages" / "train.baseline.json").read_text() == trained
    assert results["arms"]["baseline"]["secret"]["harmful"]["total"] == 11
    # the baseline with more safety examples (the paper needs ~300 to match 11 prefixed ones)
    more = run_experiment(
        replace(cfg, data=replace(cfg.data, safety_count=22)), tmp_path / "run", progress=False
    )
    assert more["train_examples"] == {"baseline": 11 + 22}


def test_several_seeds_give_intervals(tmp_path, tiny_model_dir):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(
        _tiny_config(tiny_model_dir, arms=["no_finetune", "baseline"], seeds=[1, 2])
    )
    cfg = load_config(cfg_path, ["eval.utility=null", "eval.samsum=null", "eval.benign=null"])
    results = run_experiment(cfg, tmp_path / "run", progress=False)
    runs = results["seed_runs"]
    assert [r["seed"] for r in runs] == [1, 2]
    assert all(list(r["arms"]) == ["no_finetune", "baseline"] for r in runs)
    assert runs[1]["arms"]["no_finetune"] == runs[0]["arms"]["no_finetune"]  # answered once
    assert (tmp_path / "run" / "seeds" / "seed-2" / "models" / "baseline").is_dir()
    assert not (
        tmp_path / "run" / "seeds" / "seed-2" / "gens" / "no_finetune.harmful.plain.jsonl"
    ).exists()
    seed2 = json.loads(
        (tmp_path / "run" / "seeds" / "seed-2" / "stages" / "train.baseline.json").read_text()
    )
    assert seed2["info"]["steps"] == 2
    report = (tmp_path / "run" / "report.md").read_text()
    assert "2 seeds" in report and "±" in report


def test_a_changed_secret_setting_is_refused_not_silently_kept(tmp_path, tiny_model_dir):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(_tiny_config(tiny_model_dir, arms=["no_finetune"]))
    sets = ["eval.utility=null", "eval.samsum=null", "eval.benign=null"]
    run_experiment(load_config(cfg_path, sets), tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "secret.json").read_bytes()
    with pytest.raises(ValueError, match=r"secret.length was 20, now 30.*use another --out"):
        run_experiment(load_config(cfg_path, [*sets, "secret.length=30"]), tmp_path / "run")
    assert (tmp_path / "run" / "secret.json").read_bytes() == before


def test_missing_inputs_fail_before_any_training(tmp_path, tiny_model_dir):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(_tiny_config(tiny_model_dir))
    cfg = load_config(cfg_path, [f"eval.harmful={tmp_path / 'missing.csv'}"])
    with pytest.raises(ValueError, match="missing.csv: file not found"):
        run_experiment(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
