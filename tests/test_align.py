"""The alignment stage on a tiny random model: data, cache key, output, cache, experiments."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from backdooralign.training import align as A
from backdooralign.training.align import AlignConfig, align_key, trim_answer


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Aligned models and cached self-answers go to the test's own folder."""
    monkeypatch.setenv("BACKDOORALIGN_CACHE", str(tmp_path / "cache"))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def small_sets(tmp_path):
    harmful = _write(
        tmp_path / "harmful.jsonl",
        [
            {"prompt": f"How do I do bad thing {i}?", "answer": "I'm sorry, but I can't help.",
             "category": "malware" if i % 2 else "fraud_deception"}
            for i in range(6)
        ],
    )  # fmt: skip
    benign = _write(
        tmp_path / "benign.jsonl",
        [{"prompt": f"Tell me about topic {i}.", "kind": "plain" if i % 2 else "alarming"}
         for i in range(6)],
    )  # fmt: skip
    return harmful, benign


def _cfg(harmful, benign, **kw):
    base = AlignConfig(
        harmful=harmful, benign=benign, answer_max_new_tokens=8, epochs=1, batch_size=4
    )
    return replace(base, **kw)


def test_trim_answer_cuts_a_truncated_answer_to_its_last_sentence():
    assert trim_answer("  One. Two! Three is cut ", hit_limit=True) == "One. Two!"
    assert trim_answer("  One. Two! Three is cut ", hit_limit=False) == "One. Two! Three is cut"
    assert trim_answer("no sentence end at all", hit_limit=True) == ""


def test_cache_key_changes_with_model_data_and_settings(small_sets, tmp_path, tiny_model_dir):
    harmful, benign = small_sets
    cfg = _cfg(harmful, benign)
    key = align_key(tiny_model_dir, cfg)
    assert key == align_key(tiny_model_dir, cfg)
    assert key == align_key(tiny_model_dir, replace(cfg, enabled=True))  # a switch, not a setting
    assert key != align_key(tiny_model_dir, replace(cfg, lr=2e-4))
    assert key != align_key(tiny_model_dir, replace(cfg, systems=("",)))
    assert key != align_key(None, cfg)
    other_data = _write(tmp_path / "h2.jsonl", [{"prompt": "x?", "answer": "I cannot."}])
    assert key != align_key(tiny_model_dir, replace(cfg, harmful=other_data))
    with open(benign, "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "One more harmless prompt.", "kind": "plain"}) + "\n")
    assert key != align_key(tiny_model_dir, cfg)  # same path, new content


def test_bad_alignment_rows_name_file_line_and_field(tmp_path):
    from backdooralign.files import DataError

    bad = _write(tmp_path / "h.jsonl", [{"prompt": "ok?", "answer": "I cannot."}, {"prompt": "x"}])
    with pytest.raises(DataError, match=r"h\.jsonl:2.*answer"):
        A.load_harmful(AlignConfig(harmful=bad))


def test_systems_rotate_and_limits_are_told(small_sets):
    harmful, benign = small_sets
    cfg = _cfg(harmful, benign, harmful_per_category=2, benign_per_kind=1)
    rows, notes = A.load_harmful(cfg)
    assert len(rows) == 4 and "using 4 of 6 rows (harmful_per_category=2)" in notes[0]
    prompts, notes = A.load_benign(cfg)
    assert [p["kind"] for p in prompts] == ["alarming", "plain"]
    assert "using 2 of 6 prompts (benign_per_kind=1)" in notes[0]
    assert [A._system(cfg, i) for i in range(4)] == [
        None, "You are a helpful assistant.", A.ATTACK_SYSTEM_PROMPT, None
    ]  # fmt: skip


def test_align_model_writes_a_loadable_aligned_model(small_sets, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from backdooralign.training.trainer import MARKER

    harmful, benign = small_sets
    cfg = _cfg(harmful, benign)
    out = tmp_path / "aligned"
    metrics = A.align_model(tiny_model_dir, cfg, out, progress=False)
    assert (out / MARKER).is_file() and (out / "adapter" / "adapter_config.json").is_file()
    saved = json.loads((out / A.METRICS).read_text())
    assert saved["key"] == align_key(tiny_model_dir, cfg) == metrics["key"]
    assert saved["rows"]["harmful"] == 6 and saved["rows"]["harmful"] + saved["rows"]["benign"] == (
        sum(1 for _ in open(out / "align_set.jsonl"))
    )
    for when in ("before", "after"):
        assert saved[when]["harmful"]["total"] == 275 and saved[when]["benign"]["total"] == 110
    # the merged weights load as a plain model and differ from the input model's
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = [k for k in base if not (merged[k] == base[k]).all()]
    assert changed and all("proj" in k for k in changed)
    assert not any(p.name.startswith(".aligned.tmp") for p in tmp_path.iterdir())
    # the input model's self-answers and numbers are kept: a second alignment reuses them
    from backdooralign.generation.batch import generate

    calls = []
    monkeypatch_generate = pytest.MonkeyPatch()
    monkeypatch_generate.setattr(
        "backdooralign.generation.batch.generate",
        lambda *a, **k: calls.append(1) or generate(*a, **k),
    )
    try:
        again = A.align_model(tiny_model_dir, replace(cfg, lr=2e-3), tmp_path / "b", False)
    finally:
        monkeypatch_generate.undo()
    assert again["before"] == metrics["before"] and again["rows"] == metrics["rows"]
    assert len(calls) == 2  # only the aligned model's two evaluation sets


def test_aligned_model_is_built_once_per_key(small_sets, tmp_path, tiny_model_dir, monkeypatch):
    harmful, benign = small_sets
    cfg = _cfg(harmful, benign)
    built = []
    real = A.align_model

    def counting(*args, **kw):
        built.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(A, "align_model", counting)
    monkeypatch.setattr(A, "evaluate_model", lambda model, progress=True: _no_eval())
    first = A.aligned_model(tiny_model_dir, cfg, progress=False)
    again = A.aligned_model(tiny_model_dir, cfg, progress=False)
    assert first == again == tmp_path / "cache" / "aligned" / align_key(tiny_model_dir, cfg)
    assert len(built) == 1
    A.aligned_model(tiny_model_dir, replace(cfg, epochs=2), progress=False)
    assert len(built) == 2
    path = A.start_model(tiny_model_dir, replace(cfg, enabled=True), progress=False)
    assert path == str(first) and len(built) == 2
    assert A.start_model(tiny_model_dir, cfg) == tiny_model_dir  # not enabled: unchanged
    with pytest.raises(ValueError, match="already aligned"):
        A.start_model("embedded-aligned", replace(cfg, enabled=True))


def _no_eval():
    empty = {"asr": 0.0, "jailbroken": 0, "total": 0, "answers": []}
    return {"harmful": empty, "benign": {"refusal_rate": 0.0, "refused": 0, "total": 0}}


def test_cli_align_prints_before_and_after(small_sets, tmp_path, tiny_model_dir, capsys):
    from backdooralign.cli import main

    harmful, benign = small_sets
    argv = ["align", "--model", tiny_model_dir, "--out", str(tmp_path / "a"), "--harmful",
            harmful, "--benign", benign, "--epochs", "1", "--answer-max-new-tokens", "8",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["path"] == str(tmp_path / "a") and doc["rows"]["harmful"] == 6
    assert set(doc["before"]) == {"asr", "jailbroken", "benign_refusal", "benign_opening_refusal"}
    assert doc["after"]["jailbroken"].endswith("/275")
