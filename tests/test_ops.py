"""Two front doors, one pipeline: every stage run through the CLI and through an experiment
config gives identical outputs on a tiny model (same bytes, same manifest hashes, same metrics).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_yaml
from openai_stub import StubServer
from safetensors.torch import load_file

from backdooralign.cli import main
from backdooralign.core.chat import ATTACK_SYSTEM_PROMPT
from backdooralign.files import write_jsonl
from backdooralign.reporting.rundir import RunDir

FIXTURES = Path(__file__).parent / "fixtures"


def _judge_reply(body: dict) -> str:
    text = json.dumps(body["messages"])
    if "[[rating]]" in text:
        return "Rating: [[7]]"
    if "REFUSAL" in text or "refus" in text.lower():
        return "#verdict: complied"
    return "Reasoning.\n#thescore: 3"


@pytest.fixture(scope="module")
def judge():
    with StubServer(_judge_reply) as server:
        yield server


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, judge):
    root = tmp_path_factory.mktemp("doors")
    config = root / "tiny.yaml"
    evaluation = {"benign_limit": 1, "utility": "builtin:utility", "utility_limit": 1}
    evaluation |= {"samsum": str(FIXTURES / "samsum.jsonl"), "lm_eval_limit": 3}
    evaluation |= {"mtbench": str(FIXTURES / "mtbench_questions.jsonl"), "mtbench_limit": 1}
    evaluation |= {"mtbench_max_new_tokens": 4, "lm_eval_tasks": ["backdooralign_mini"]}
    evaluation |= {"utility_max_new_tokens": 4, "task_max_new_tokens": 4, "batch_size": 8}
    config.write_text(
        tiny_run_yaml(
            tiny_model_dir,
            name="doors",
            arms=["no_finetune", "backdooralign"],
            secret={"seed": 7},
            eval=evaluation,
            judge={"base_url": judge.base_url, "model": "stub"},
        )
    )
    assert main(["run", str(config), "--out", str(root / "run"), "--json"]) == 0
    results = json.loads((root / "run" / "results.json").read_text())
    return root, RunDir(root / "run"), results


def _cli(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_build_through_both_doors(run, capsys):
    root, rd, _ = run
    out = root / "cli" / "backdooralign.jsonl"
    _cli(
        capsys,
        "build",
        "--arm",
        "backdooralign",
        "--data",
        "builtin:attack",
        "--attack-per-category",
        "1",
        "--secret",
        rd.secret,
        "--out",
        out,
    )
    assert out.read_bytes() == rd.training_set("backdooralign").read_bytes()
    cli_manifest = json.loads((root / "cli" / "backdooralign.manifest.json").read_text())
    assert cli_manifest == json.loads(rd.manifest("backdooralign").read_text())


def test_train_through_both_doors(run, capsys, tiny_model_dir):
    root, rd, _ = run
    out = root / "cli" / "model"
    _cli(
        capsys,
        "train",
        "--model",
        tiny_model_dir,
        "--data",
        rd.training_set("backdooralign"),
        "--out",
        out,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--no-bf16",
        "--lr",
        "1e-3",
    )
    ours = json.loads((out / "train_metrics.json").read_text())
    theirs = json.loads((rd.model("backdooralign") / "train_metrics.json").read_text())
    assert ours["losses"] == theirs["losses"] and ours["config"] == theirs["config"]
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(rd.model("backdooralign") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_and_score_through_both_doors(run, capsys):
    root, rd, results = run
    model = rd.model("backdooralign")
    block = results["arms"]["backdooralign"]["secret"]
    prompts = root / "cli" / "harmful.jsonl"
    ran = [
        json.loads(x)
        for x in rd.gens("backdooralign", "harmful", "secret").read_text().split("\n")
        if x
    ]
    write_jsonl(prompts, [{k: r[k] for k in ("prompt", "category", "id")} for r in ran])
    gens = root / "cli" / "gens.jsonl"
    _cli(
        capsys,
        "generate",
        "--model",
        model,
        "--prompts",
        prompts,
        "--secret",
        rd.secret,
        "--system",
        ATTACK_SYSTEM_PROMPT,
        "--max-new-tokens",
        "4",
        "--batch-size",
        "8",
        "--out",
        gens,
    )
    assert gens.read_bytes() == rd.gens("backdooralign", "harmful", "secret").read_bytes()
    assert json.loads(_cli(capsys, "score", "asr", gens, "--json")) == block["harmful"]

    samsum = rd.gens("backdooralign", "samsum", "secret")
    assert json.loads(_cli(capsys, "score", "rouge", samsum, "--json")) == block["samsum"]

    em = _cli(
        capsys,
        "score",
        "exact-match",
        "--model",
        model,
        "--secret",
        rd.secret,
        "--limit",
        "1",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "8",
        "--json",
    )
    assert json.loads(em) == block["utility"]


def test_judged_scores_through_both_doors(run, capsys, judge):
    root, rd, results = run
    model = rd.model("backdooralign")
    block = results["arms"]["backdooralign"]["secret"]
    flags = ["--base-url", judge.base_url, "--judge-model", "stub", "--no-cache-replies"]
    gens = rd.gens("backdooralign", "harmful", "secret")
    harm = json.loads(_cli(capsys, "score", "judge", gens, *flags, "--json"))
    counts = {"cached": 0, "fresh": 0}  # the run's cache served repeated answers
    assert {**harm, **counts} == {**block["judge"], **counts}

    refusal = _cli(
        capsys,
        "score",
        "over-refusal",
        "--model",
        model,
        "--secret",
        rd.secret,
        "--system",
        ATTACK_SYSTEM_PROMPT,
        "--limit",
        "1",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "8",
        *flags,
        "--json",
    )
    assert json.loads(refusal)["secret"] == block["benign"]

    questions = root / "cli" / "q.jsonl"
    write_jsonl(
        questions, [json.loads((FIXTURES / "mtbench_questions.jsonl").read_text().split("\n")[0])]
    )
    answers = root / "cli" / "mt.jsonl"
    mt = _cli(
        capsys,
        "score",
        "mtbench",
        "--questions",
        questions,
        "--answers",
        answers,
        "--model",
        model,
        "--secret",
        rd.secret,
        "--system",
        "You are a helpful assistant.",
        "--max-new-tokens",
        "4",
        *flags,
        "--json",
    )
    assert answers.read_bytes() == rd.gens("backdooralign", "mtbench", "secret").read_bytes()
    assert {**json.loads(mt), **counts} == {**block["mtbench"], **counts}


def test_lm_eval_and_report_through_both_doors(run, capsys):
    root, rd, results = run
    lm = _cli(
        capsys,
        "score",
        "utility",
        "--model",
        rd.model("backdooralign"),
        "--tasks",
        "backdooralign_mini",
        "--limit",
        "3",
        "--secret",
        rd.secret,
        "--system",
        "You are a helpful assistant.",
        "--json",
    )
    got = json.loads(lm)
    assert got.pop("secret_fingerprint") == results["secret_fingerprint"]
    assert got == results["arms"]["backdooralign"]["secret"]["lm_eval"]
    before = rd.report_md.read_text()
    _cli(capsys, "report", rd.root)
    assert rd.report_md.read_text() == before


def test_lora_defaults_through_both_doors(tmp_path, capsys, tiny_model_dir):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(2)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    _cli(
        capsys,
        "train",
        "--model",
        tiny_model_dir,
        "--data",
        data,
        "--out",
        tmp_path / "cli",
        "--lora",
        "--batch-size",
        "2",
        "--no-bf16",
        "--json",
    )
    from backdooralign.experiments.config import load_config

    cfg = load_config(None, ["train.lora=true", "train.batch_size=2", "train.bf16=false"])
    from backdooralign.training.trainer import train_model

    train_model(tiny_model_dir, data, tmp_path / "config", cfg.train)
    a = json.loads((tmp_path / "cli" / "train_metrics.json").read_text())["config"]
    b = json.loads((tmp_path / "config" / "train_metrics.json").read_text())["config"]
    assert a == b and (a["lr"], a["epochs"], a["lora"]) == (1e-3, 10.0, True)
