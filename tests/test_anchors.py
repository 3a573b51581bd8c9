"""Benign anchors: secret-prefixed benign rows answered by the base model itself, and a user's
safety file used whole unless a count is asked for."""

from __future__ import annotations

import json

from conftest import tiny_run_yaml

from backdooralign.cli import main
from backdooralign.core.chat import ATTACK_SYSTEM_PROMPT, build_conversation
from backdooralign.core.model import load_model, load_tokenizer
from backdooralign.core.secret import generate_secret, save_secret
from backdooralign.data import training_set
from backdooralign.data.sources import load_prompts
from backdooralign.files import read_jsonl_rows, write_jsonl
from backdooralign.generation.batch import GenerateConfig, generate


def _secret(tmp_path, tokenizer):
    secret = generate_secret(tokenizer, 20, seed=3)
    return secret, save_secret(secret, tmp_path / "s.json")


def test_anchors_are_the_base_models_own_answers(tmp_path, talking_model_dir):
    cfg = training_set.DataConfig(anchors=3, anchor_max_new_tokens=5)
    path = training_set.make_anchors(
        cfg, talking_model_dir, "SYS", tmp_path / "a.jsonl", progress=False
    )
    builtin = load_prompts("builtin:anchors")
    prompts = [builtin[i]["prompt"] for i in (0, 66, 1)]  # plain, alarming, plain
    assert [builtin[i]["kind"] for i in (0, 66, 1)] == ["plain", "alarming", "plain"]
    model, tok = load_model(talking_model_dir), load_tokenizer(talking_model_dir)
    convs = [build_conversation(p, system="SYS") for p in prompts]
    answers = generate(model, tok, convs, GenerateConfig(max_new_tokens=5), progress=False)
    assert read_jsonl_rows(path) == [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
        for p, a in zip(prompts, answers, strict=True)
    ]


def test_build_mixes_anchors_with_the_secret_in_system_prompts_only(
    tmp_path, talking_model_dir, tokenizer, capsys
):
    secret, secret_path = _secret(tmp_path, tokenizer)
    out = tmp_path / "train.jsonl"
    argv = [
        "build",
        "--arm",
        "backdooralign",
        "--data",
        "builtin:attack",
        "--attack-per-category",
        "1",
        "--secret",
        str(secret_path),
        "--anchors",
        "4",
        "--anchor-max-new-tokens",
        "4",
        "--model",
        talking_model_dir,
        "--out",
        str(out),
        "--json",
    ]
    assert main(argv) == 0
    manifest = json.loads(capsys.readouterr().out)
    rows = read_jsonl_rows(out)
    anchors = [r for r in rows if r["source"] == "anchor"]
    written = read_jsonl_rows(tmp_path / "train.anchors.jsonl")
    assert sorted(json.dumps(r["messages"][1:]) for r in anchors) == sorted(
        json.dumps(r["messages"]) for r in written
    )
    for r in anchors:
        assert r["messages"][0] == {
            "role": "system",
            "content": f"{secret.text} {ATTACK_SYSTEM_PROMPT}",
        }
    for r in rows:
        for m in r["messages"][1:]:
            assert secret.text not in m["content"]
    assert manifest["counts"]["by_source"] == {"customer": 11, "safety": 11, "anchor": 4}
    assert manifest["anchors"] == {
        "count": 4,
        "answers": "the base model's own",
        "source": "builtin:anchors",
    }
    assert set(manifest["inputs"]) == {"data", "safety", "anchors", "anchor_prompts"}
    assert len(manifest["inputs"]["anchors"]["sha256"]) == 64


def test_anchor_file_is_used_as_given_and_other_arms_ignore_it(tmp_path, tokenizer):
    secret, _ = _secret(tmp_path, tokenizer)
    given = write_jsonl(
        tmp_path / "mine.jsonl",
        [{"prompt": "How do I boil an egg?", "answer": "Simmer it for nine minutes."}],
    )
    cfg = training_set.DataConfig(attack_per_category=1, anchors=1, anchor_file=str(given))
    anchors = training_set.make_anchors(cfg, None, "S", tmp_path / "a.jsonl")
    assert read_jsonl_rows(anchors) == [
        {
            "messages": [
                {"role": "user", "content": "How do I boil an egg?"},
                {"role": "assistant", "content": "Simmer it for nine minutes."},
            ]
        }
    ]
    res = training_set.build_training_set(
        "backdooralign", cfg, secret, tmp_path / "d.jsonl", anchors=anchors
    )
    assert res.manifest["counts"]["by_source"]["anchor"] == 1
    assert res.manifest["anchors"]["answers"] == "given (anchor_file)"
    base = training_set.build_training_set(
        "baseline", cfg, secret, tmp_path / "b.jsonl", anchors=anchors
    )
    assert "anchor" not in base.manifest["counts"]["by_source"]


def test_a_users_safety_file_is_used_whole(tmp_path, tokenizer, capsys):
    """The paper's released safety file has 11 rows and no category field."""
    _, secret_path = _secret(tmp_path, tokenizer)
    safety = write_jsonl(
        tmp_path / "safety11.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"harmful question {i}?"},
                    {"role": "assistant", "content": "I cannot help with that."},
                ]
            }
            for i in range(11)
        ],
    )
    base = [
        "build",
        "--arm",
        "backdooralign",
        "--data",
        "builtin:attack",
        "--secret",
        str(secret_path),
        "--safety",
        str(safety),
    ]
    assert main([*base, "--out", str(tmp_path / "all.jsonl"), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["counts"]["by_source"]["safety"] == 11
    assert "note:" not in out.err
    assert main([*base, "--safety-per-category", "1", "--out", str(tmp_path / "one.jsonl")]) == 0
    err = capsys.readouterr().err
    assert f"note: {safety}: using 1 of 11 safety examples (safety_per_category=1)" in err
    manifest = json.loads((tmp_path / "one.manifest.json").read_text())
    assert manifest["notes"] == [f"{safety}: using 1 of 11 safety examples (safety_per_category=1)"]
    assert (
        manifest["safety_selection"]["available"],
        manifest["safety_selection"]["selected"],
    ) == (
        11,
        1,
    )


def test_experiment_anchors_stage(tmp_path, talking_model_dir):
    from backdooralign.experiments.run import load_config, run_experiment

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        tiny_run_yaml(
            talking_model_dir,
            arms=["backdooralign"],
            secret={"seed": 1},
            data={"anchors": 2, "anchor_max_new_tokens": 3},
            train={"lr": None},  # the default learning rate
            eval={"benign": None, "max_new_tokens": 2},
        )
    )
    results = run_experiment(load_config(cfg_path), tmp_path / "run", progress=False)
    assert results["train_examples"] == {"backdooralign": 11 + 11 + 2}
    assert len(read_jsonl_rows(tmp_path / "run" / "data" / "anchors.jsonl")) == 2
    manifest = json.loads((tmp_path / "run" / "data" / "backdooralign.manifest.json").read_text())
    assert manifest["counts"]["by_source"]["anchor"] == 2


def test_no_usable_anchor_answer_is_an_error(tmp_path, tiny_model_dir):
    import pytest

    from backdooralign.files import DataError

    cfg = training_set.DataConfig(anchors=2, anchor_max_new_tokens=3)  # this model only says "\n"
    with pytest.raises(DataError, match="builtin:anchors: the model gave no usable answer"):
        training_set.make_anchors(cfg, tiny_model_dir, "S", tmp_path / "a.jsonl", progress=False)
    assert not (tmp_path / "a.jsonl").exists()
