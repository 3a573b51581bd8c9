"""Training steps on a tiny random model: full fine-tuning and LoRA."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_dead_work_dir
from transformers import AutoModelForCausalLM

from backdooralign.core.chat import build_conversation
from backdooralign.training.trainer import TrainConfig, tokenize_rows, train


def _rows(n=4):
    return [
        {
            "messages": build_conversation(
                [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"Sure, answer {i}."},
                ],
                system="S",
            )
        }
        for i in range(n)
    ]


def _params(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_full_finetune_changes_weights(tmp_path, tiny_model_dir):
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=2, bf16=False)
    metrics = train(tiny_model_dir, _rows(), tmp_path / "out", cfg)
    assert metrics["steps"] == 2
    before, after = _params(tiny_model_dir), _params(tmp_path / "out")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert "model.layers.1.mlp.down_proj.weight" in changed
    saved = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    assert saved["examples"] == 4 and saved["config"]["lr"] == 1e-2
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_lora_changes_only_adapters(tmp_path, tiny_model_dir):
    cfg = TrainConfig(lora=True, epochs=1, batch_size=2, bf16=False, merge=True)
    assert cfg.lr == 1e-3 and cfg.epochs == 1  # explicit epochs kept, lr from the paper
    cfg = TrainConfig(**{**cfg.__dict__, "lr": 5e-2})
    train(tiny_model_dir, _rows(), tmp_path / "lora", cfg)
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "v_proj"}
    before, merged = _params(tiny_model_dir), _params(tmp_path / "lora" / "merged")
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def test_tokenize_rows_names_the_bad_row(tokenizer):
    rows = _rows(2) + [{"messages": build_conversation("only a question")}]
    with pytest.raises(ValueError, match="training row 3: conversation has no supervised token"):
        tokenize_rows(tokenizer, rows, None)


def test_supervised_loss_equals_the_models_own_loss(tiny_model_dir):
    from backdooralign.training.trainer import supervised_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # right padding
    labels = ids.clone()
    labels[:, :7] = -100
    labels[mask == 0] = -100
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = supervised_loss(model, ids, mask, labels)
    torch.testing.assert_close(got, expected)
    n = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(supervised_loss(model, ids, mask, labels, n * 2), expected / 2)


def test_two_processes_with_torchrun(tmp_path, tiny_model_dir):
    """DDP over gloo on the CPU: data is sharded, rank 0 alone writes the model and reports."""
    import subprocess
    import sys
    from pathlib import Path

    from backdooralign.files import write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", _rows(16))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "backdooralign", "train",
        "--model", tiny_model_dir, "--data", str(data), "--out", str(tmp_path / "out"),
        "--epochs", "1", "--batch-size", "4", "--no-bf16", "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count('"steps"') == 1  # one report, from rank 0
    assert json.loads(res.stdout)["steps"] == 2  # 16 rows / (2 processes x 4)
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "out" / "train_metrics.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train.jsonl"]


def test_out_must_be_ours_to_replace(tmp_path, tiny_model_dir):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "important.txt").write_text("keep me")
    (victim / "sub" / "notes.txt").write_text("me too")
    cfg = TrainConfig(epochs=1, batch_size=2, bf16=False)
    with pytest.raises(
        FileExistsError, match="victim: exists and was not written by backdooralign"
    ):
        train(tiny_model_dir, _rows(), victim, cfg)
    assert (victim / "important.txt").read_text() == "keep me"
    assert (victim / "sub" / "notes.txt").read_text() == "me too"
    afile = tmp_path / "outfile.jsonl"
    afile.write_text("{}\n")
    with pytest.raises(FileExistsError, match="outfile.jsonl: exists and is a file"):
        train(tiny_model_dir, _rows(), afile, cfg)
    assert afile.read_text() == "{}\n"


def test_a_model_directory_we_wrote_is_replaced_and_stale_temps_go(tmp_path, tiny_model_dir):
    cfg = TrainConfig(epochs=1, batch_size=2, bf16=False)
    out = tmp_path / "m"
    train(tiny_model_dir, _rows(), out, cfg)
    assert (out / ".backdooralign-model").exists()
    stale = make_dead_work_dir(out)  # what kill -9 leaves behind
    (stale / "trainer").mkdir()
    mine = tmp_path / ".m.tmp-mine"  # a user's folder that only looks like one of ours
    (mine / "notes.txt").parent.mkdir()
    (mine / "notes.txt").write_text("keep me")
    other = make_dead_work_dir(tmp_path / "othermodel")  # a leftover of another output
    train(tiny_model_dir, _rows(2), out, cfg)
    assert json.loads((out / "train_metrics.json").read_text())["examples"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", mine.name, other.name])
    assert (mine / "notes.txt").read_text() == "keep me"


def test_an_error_during_training_leaves_no_temp_folder(tmp_path, tiny_model_dir, monkeypatch):
    import transformers

    def boom(self, *args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(transformers.Trainer, "train", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        train(tiny_model_dir, _rows(), tmp_path / "m", TrainConfig(epochs=1, bf16=False))
    assert list(tmp_path.iterdir()) == []
