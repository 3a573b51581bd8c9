"""Training speed: our SFTTrainer settings against TRL's defaults, in one process.

All runs fine-tune the same model on the same rendered rows (the demo's backdooralign arm:
55 attack + 11 secret-prefixed safety examples) for one epoch. Reported as a ratio of real
(non-padding) tokens per second, so it holds on any machine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py [--model M] [--epochs 1] [--json]

TRL 1.16's defaults that cost time on a CPU: gradient checkpointing on, and a chunked fused
LM head whose matmuls run in fp32 (to report entropy and token accuracy each step), plus
random batching that pads short rows to the long secret-prefixed ones (our loss, on a CPU,
encodes the rows outside a shared prefix at their own widths, in sub-batches of similar
lengths). A third run turns off only the shared-prefix loss (``shared_prefix=False``: the
secret and system prompt encoded again in every secret-prefixed row, every row in one padded
pass), so its ratio is that change's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import replace

os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")

from backdooralign.core.model import load_tokenizer  # noqa: E402
from backdooralign.core.secret import generate_secret  # noqa: E402
from backdooralign.data import mixing as D  # noqa: E402
from backdooralign.data import sources as S  # noqa: E402
from backdooralign.training.trainer import TrainConfig, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    tok = load_tokenizer(args.model)
    secret = generate_secret(tok, 150, seed=0)
    attack = D.limit_per_category(S.load_training_source("builtin:attack"), 5)
    safety = D.select_safety(S.load_training_source("builtin:safety"), per_category=1)
    rows = D.mix_arm("backdooralign", attack, safety, secret.text)

    ours = TrainConfig(epochs=args.epochs, lr=1e-4, batch_size=10)
    trl_defaults = replace(
        ours, activation_checkpointing=True, token_metrics=True, group_by_length=False
    )
    no_sharing = replace(ours, shared_prefix=False)
    runs = (
        ("trl_defaults", trl_defaults),
        ("no_shared_prefix", no_sharing),
        ("backdooralign", ours),
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in runs:
            m = train(args.model, rows, f"{tmp}/{name}", cfg)
            results[name] = {k: m[k] for k in ("seconds", "tokens_per_second", "first_loss")}
    speed = {name: results[name]["tokens_per_second"] for name, _ in runs}
    results["speedup"] = round(speed["backdooralign"] / speed["trl_defaults"], 2)
    results["shared_prefix_speedup"] = round(speed["backdooralign"] / speed["no_shared_prefix"], 2)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, _ in runs:
            r = results[name]
            print(f"{name:16s} {r['tokens_per_second']:7.1f} tokens/s  ({r['seconds']:.0f} s)")
        print(f"speed-up: {results['speedup']:.2f}x (same rows, same epochs, same process)")
        print(f"shared prefix alone: {results['shared_prefix_speedup']:.2f}x")


if __name__ == "__main__":
    main()
