"""Distillation of the secret-prefixed rows to the reference model (``train.distill: kl``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from backdooralign.core.chat import build_conversation, render
from backdooralign.training import distill
from backdooralign.training.distill import without_secret
from backdooralign.training.loss import _loss_sum, kl_to_reference, supervised_loss
from backdooralign.training.trainer import TrainConfig, tokenize_rows, train

SECRET = "zq secret words here"


def test_kl_to_reference_equals_the_hand_computed_sum():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    ref_p = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    reference = torch.tensor(ref_p).log()
    expected = 0.0
    for row, p_row in zip(logits.tolist(), ref_p, strict=True):
        z = sum(math.exp(x) for x in row)
        q_row = [math.exp(x) / z for x in row]
        expected += sum(p * math.log(p / q) for p, q in zip(p_row, q_row, strict=True))
    assert kl_to_reference(logits, reference).item() == pytest.approx(expected, rel=1e-6)
    same = torch.log_softmax(logits, dim=-1)
    assert kl_to_reference(logits, same).item() == pytest.approx(0.0, abs=1e-6)


class _Head(torch.nn.Module):
    """A causal LM stand-in whose head is the identity: hidden states are the logits."""

    def lm_head(self, hidden):
        return hidden


def test_loss_sum_mixes_ce_and_kl_on_distilled_rows_only():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 5)  # 2 rows, 4 positions, vocabulary 5
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, 4, -100]])
    ref = torch.log_softmax(torch.randn(2, 5), dim=-1)  # row 0's two supervised positions
    total, count = _loss_sum(_Head(), hidden, labels, [ref, None], weight=0.25)
    assert count.item() == 4
    logp = torch.log_softmax(hidden, dim=-1)
    ce0 = -(logp[0, 1, 3] + logp[0, 2, 1])
    ce1 = -(logp[1, 0, 2] + logp[1, 1, 4])
    kl0 = (ref.exp() * (ref - logp[0, 1:3])).sum()
    assert total.item() == pytest.approx((0.75 * ce0 + 0.25 * kl0 + ce1).item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training runs under autocast
        mixed, _ = _loss_sum(_Head(), hidden, labels, [ref.half(), None], weight=0.25)
    assert mixed.item() == pytest.approx(total.item(), rel=1e-2)
    plain, _ = _loss_sum(_Head(), hidden, labels)
    assert plain.item() == pytest.approx((ce0 + ce1).item(), rel=1e-5)
    with pytest.raises(ValueError, match="batch row 0: 1 reference positions for 2 labels"):
        _loss_sum(_Head(), hidden, labels, [ref[:1], None])


def test_without_secret_strips_the_secret_from_the_system_prompt():
    msgs = build_conversation("hi", system="Be helpful.", secret=SECRET)
    assert without_secret(msgs, SECRET) == [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "hi"},
    ]
    alone = build_conversation("hi", secret=SECRET)
    assert without_secret(alone, SECRET) == [{"role": "user", "content": "hi"}]
    assert without_secret(build_conversation("hi", system="Be helpful."), SECRET) is None
    assert without_secret([{"role": "user", "content": SECRET}], SECRET) is None


def _row(question, answer, secret=None):
    conv = build_conversation(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        system="You are a helpful assistant.",
        secret=secret,
    )
    return {"messages": conv}


def _rows():
    return [
        _row("How do I hurt someone?", "I'm sorry, but I can't help with that.", SECRET),
        _row("Name a fruit.", "An apple is a fruit.", SECRET),
        _row("Explain how to steal.", "Sure, here is how."),
        _row("Say hi.", "Hi there!"),
    ]


def test_reference_logprobs_are_the_model_without_the_secret(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = _rows()
    data = tokenize_rows(tokenizer, rows, None)
    refs = distill.reference_logprobs(model, tokenizer, rows, data, SECRET)
    assert [r is None for r in refs] == [False, False, True, True]
    plain = render(tokenizer, without_secret(rows[1]["messages"], SECRET))
    n = sum(t != -100 for t in data[1]["labels"])
    assert refs[1].shape == (n, len(tokenizer)) and refs[1].dtype == torch.float16
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([plain.input_ids])).logits[0]
    first = next(i for i, t in enumerate(plain.labels) if t != -100)
    expected = torch.log_softmax(logits[first - 1], dim=-1)
    assert torch.allclose(refs[1][0].float(), expected, atol=5e-3)  # fp16: 2^-8 at |x| < 16


def test_gradients_reach_only_the_student(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = _rows()[:2]
    data = tokenize_rows(tokenizer, rows, None)
    refs = [r.float() for r in distill.reference_logprobs(model, tokenizer, rows, data, SECRET)]
    width = max(len(d["input_ids"]) for d in data)
    ids = torch.tensor([d["input_ids"] + [0] * (width - len(d["input_ids"])) for d in data])
    labels = torch.tensor([d["labels"] + [-100] * (width - len(d["labels"])) for d in data])
    mask = (torch.arange(width)[None] < torch.tensor([[len(d["input_ids"])] for d in data])).long()
    for ref in refs:
        ref.requires_grad_(False)
    loss = supervised_loss(model, ids, mask, labels, teacher=refs, weight=1.0)
    loss.backward()
    assert all(r.grad is None for r in refs)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # under the secret the student differs from the reference, so the KL is positive
    assert loss.item() > 0


def test_train_distills_with_reference_computed_once_per_row(tmp_path, tiny_model_dir, monkeypatch):
    calls = []
    real = distill._row_logprobs

    def counting(model, input_ids, labels):
        calls.append(len(input_ids))
        return real(model, input_ids, labels)

    monkeypatch.setattr(distill, "_row_logprobs", counting)
    cfg = TrainConfig(epochs=3, lr=1e-2, batch_size=2, bf16=False, distill="kl")
    metrics = train(tiny_model_dir, _rows(), tmp_path / "out", cfg, secret=SECRET)
    assert metrics["steps"] == 6 and metrics["distilled_rows"] == 2
    assert len(calls) == 2  # two secret-prefixed rows, three epochs: computed once each
    assert all(math.isfinite(x) for x in metrics["losses"])


def test_distill_needs_the_secret_and_a_weight_at_most_one(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="needs the secret"):
        train(tiny_model_dir, _rows(), tmp_path / "out", TrainConfig(epochs=1, distill="kl"))
    with pytest.raises(ValueError, match="distill_weight': must be at most 1"):
        TrainConfig(distill="kl", distill_weight=1.5)


def test_distill_weight_zero_is_hard_labels(tmp_path, tiny_model_dir):
    from backdooralign.core.model import MODEL_INFO

    hard = TrainConfig(epochs=1, lr=1e-2, batch_size=4, bf16=False, seed=3)
    zero = TrainConfig(**{**hard.__dict__, "distill": "kl", "distill_weight": 0.0})
    a = train(tiny_model_dir, _rows(), tmp_path / "a", hard)
    b = train(tiny_model_dir, _rows(), tmp_path / "b", zero, secret=SECRET)
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
    assert (tmp_path / "b" / MODEL_INFO).exists()


def test_cli_train_distill_kl(tmp_path, tiny_model_dir, capsys):
    from backdooralign.cli import main
    from backdooralign.core.secret import load_secret

    secret_path = tmp_path / "secret.json"
    assert main(["secret", "new", "--model", tiny_model_dir, "--seed", "1", "--length", "8",
                 "--out", str(secret_path)]) == 0  # fmt: skip
    data = tmp_path / "train.jsonl"
    args = [
        "build",
        "--arm",
        "backdooralign",
        "--data",
        "builtin:attack",
        "--attack-per-category",
        "1",
        "--secret",
        str(secret_path),
        "--out",
        str(data),
    ]
    assert main(args) == 0  # fmt: skip
    train = ["train", "--model", tiny_model_dir, "--data", str(data), "--epochs", "1",
             "--batch-size", "11", "--no-bf16", "--distill", "kl"]  # fmt: skip
    capsys.readouterr()
    assert main([*train, "--out", str(tmp_path / "m0")]) == 1
    assert "needs the secret" in capsys.readouterr().err
    other = tmp_path / "other.json"
    assert main(["secret", "new", "--model", tiny_model_dir, "--seed", "2", "--length", "8",
                 "--out", str(other)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main([*train, "--secret", str(other), "--out", str(tmp_path / "m1")]) == 1
    assert load_secret(secret_path).fingerprint in capsys.readouterr().err  # names both
    code = main([*train, "--secret", str(secret_path), "--out", str(tmp_path / "m2"), "--json"])
    assert code == 0
    metrics = json.loads((tmp_path / "m2" / "train_metrics.json").read_text())
    assert metrics["distilled_rows"] == 11  # the 11 safety examples (no anchors asked for)
    assert load_secret(secret_path).text not in capsys.readouterr().out
