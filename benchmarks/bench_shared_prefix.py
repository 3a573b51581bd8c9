"""The shared-prefix loss against the plain pass, one training step at a time, in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_shared_prefix.py [--model M] [--rounds 3]

Batches of the demo's BackdoorAlign training set (33 attack rows, 22 secret-prefixed safety
examples, 16 secret-prefixed anchors with stand-in answers; batches of 5, the longest rows
together as ``group_by_length`` puts them) get a forward and backward pass with the shared
prefix encoded once and with every row encoded whole, alternating pass by pass so that a
machine's load falls on both alike. Reports the ratio of the summed times and checks the
losses agree.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from backdooralign.core.model import load_tokenizer, resolve_model  # noqa: E402
from backdooralign.core.secret import generate_secret  # noqa: E402
from backdooralign.data import mixing as D  # noqa: E402
from backdooralign.data import sources as S  # noqa: E402
from backdooralign.training.loss import MIN_SHARED_PREFIX, supervised_loss  # noqa: E402
from backdooralign.training.trainer import tokenize_rows  # noqa: E402


def batches(tok, batch_size: int) -> list[tuple]:
    """Right-padded (ids, mask, labels) batches of the demo's set, longest rows first."""
    secret = generate_secret(tok, 150, seed=0)
    attack = D.limit_per_category(S.load_training_source("builtin:attack"), 3)
    safety = D.select_safety(S.load_training_source("builtin:safety"), per_category=2)
    prompts = D.interleave(S.load_prompts("builtin:anchors"), 16, "kind")
    answer = "Here is a short, helpful answer to your question, with a few points to consider."
    anchors = [
        {
            "messages": [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": answer},
            ]
        }
        for p in prompts
    ]
    rows = D.mix_arm("backdooralign", attack, safety, secret.text, anchors=anchors)
    data = sorted(tokenize_rows(tok, rows, None), key=lambda d: -len(d["input_ids"]))
    out = []
    for start in range(0, len(data), batch_size):
        chunk = data[start : start + batch_size]
        width = max(len(d["input_ids"]) for d in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for i, d in enumerate(chunk):
            n = len(d["input_ids"])
            ids[i, :n], mask[i, :n] = torch.tensor(d["input_ids"]), 1
            labels[i, :n] = torch.tensor(d["labels"])
        out.append((ids, mask, labels))
    return out


def step(model, batch, min_prefix) -> tuple[float, float]:
    model.zero_grad()
    start = time.perf_counter()
    loss = supervised_loss(model, *batch, min_prefix=min_prefix)
    loss.backward()
    return time.perf_counter() - start, loss.item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--rounds", type=int, default=2, help="passes over all batches")
    p.add_argument("--batch-size", type=int, default=5)
    args = p.parse_args()
    tok = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32)
    model.train()
    data = batches(tok, args.batch_size)
    step(model, data[0], None)  # warm-up, untimed
    seconds = {"shared": 0.0, "plain": 0.0}
    worst = 0.0
    for _ in range(args.rounds):
        for batch in data:
            t_shared, l_shared = step(model, batch, MIN_SHARED_PREFIX)
            t_plain, l_plain = step(model, batch, None)
            seconds["shared"] += t_shared
            seconds["plain"] += t_plain
            worst = max(worst, abs(l_shared - l_plain) / max(abs(l_plain), 1e-9))
    tokens = sum(int(b[1].sum()) for b in data) * args.rounds
    result = {
        "batches": len(data) * args.rounds,
        "real_tokens": tokens,
        "seconds_shared": round(seconds["shared"], 2),
        "seconds_plain": round(seconds["plain"], 2),
        "speedup": round(seconds["plain"] / seconds["shared"], 2),
        "largest_relative_loss_difference": worst,
    }
    print(json.dumps(result, indent=2))
    assert worst < 1e-4, "the shared-prefix loss differs from the plain pass"


if __name__ == "__main__":
    main()
