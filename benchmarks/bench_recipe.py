"""The training recipe keeps the method's strength: our `train` against a plain PyTorch loop.

The paper's full fine-tuning recipe (5 epochs, lr 5e-5, batch 10, a 150-token secret) on the
BackdoorAlign set of all 110 built-in attack rows and 11 secret-prefixed safety rows (one per
category), trained by variants of our `train` and by a plain loop (random batches, constant
learning rate, AdamW, fp32, the mean loss over supervised tokens: the loop the paper's authors'
code amounts to), each evaluated the same way: greedy answers to 55 held-out harmful prompts
(5 per category) with and without the secret, and 22 benign prompts with the secret.

Two shapes of data. `short` is our built-in safety set (refusals of about 53 tokens, the attack
answers about 48). `long` takes `builtin:safety_long`: the same questions with long refusals
(median 170 tokens), shaped like the authors' released safety data, where the secret-prefixed
rows are by far the longest of the set (on the authors' files our `train` reached 54.4% ASR with
the secret where the plain loop reached 13.1%).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_recipe.py --shape long \
        --variants defaults,plain [--out runs/bench-recipe] [--json]

Variants: `defaults` (TrainConfig as shipped: random batches, constant lr), `grouped_linear`
(length grouping and linear decay, the defaults until issue 17), `grouped`/`random` (batches),
`linear`/`constant` (schedule), `no_shared_prefix`, `fp32`, and `plain`. Finished variants
are reused on a re-run (models and answers under --out) when their settings are the same.
Exits 1 when the defaults' ASR with the secret is more than --margin points above the plain
loop's (when both ran). 6 to 16 minutes a variant on 2 CPU cores (plain, in fp32, the
slowest); seconds on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")

from backdooralign import files as F  # noqa: E402
from backdooralign.core.chat import ATTACK_SYSTEM_PROMPT  # noqa: E402
from backdooralign.core.model import load_model_and_tokenizer  # noqa: E402
from backdooralign.core.secret import Secret, SecretConfig, load_secret, make_secret, save_secret  # noqa: E402
from backdooralign.data import sources as S  # noqa: E402
from backdooralign.data import training_set  # noqa: E402
from backdooralign.data.mixing import limit_per_category  # noqa: E402
from backdooralign.generation.batch import GenerateConfig, answer  # noqa: E402
from backdooralign.scoring import score as scores  # noqa: E402
from backdooralign.training.trainer import TrainConfig, train_model  # noqa: E402

RECIPE = TrainConfig(epochs=5.0, lr=5e-5, batch_size=10)
VARIANTS = {
    "defaults": {},
    "grouped_linear": {"group_by_length": True, "lr_scheduler": "linear"},  # until issue 17
    "grouped": {"group_by_length": True},
    "random": {"group_by_length": False},
    "linear": {"lr_scheduler": "linear"},
    "constant": {"lr_scheduler": "constant"},
    "no_shared_prefix": {"shared_prefix": False},
    "fp32": {"bf16": False},
}
SAFETY = {"short": "builtin:safety", "long": "builtin:safety_long"}


def plain_loop(model_name, rows, out: Path, cfg: TrainConfig) -> dict:
    """Random batches (a fresh permutation each epoch), constant lr, AdamW (torch defaults),
    fp32, the model's own loss: the mean over the batch's supervised tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from backdooralign.core.model import load_tokenizer, resolve_model
    from backdooralign.training.trainer import tokenize_rows

    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(model_name)
    data = tokenize_rows(tok, rows, cfg.max_length)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_name), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses, start = [], time.perf_counter()
    for _ in range(int(cfg.epochs)):
        order = torch.randperm(len(data)).tolist()
        for i in range(0, len(order), cfg.batch_size):
            batch = [data[j] for j in order[i : i + cfg.batch_size]]
            width = max(len(b["input_ids"]) for b in batch)
            ids = torch.tensor([_pad(b["input_ids"], width, tok.pad_token_id) for b in batch])
            labels = torch.tensor([_pad(b["labels"], width, -100) for b in batch])
            lengths = torch.tensor([len(b["input_ids"]) for b in batch])
            mask = (torch.arange(width)[None] < lengths[:, None]).long()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(round(loss.item(), 4))
    model.save_pretrained(out)
    tok.padding_side = "left"
    tok.save_pretrained(out)
    metrics = {"losses": losses, "seconds": round(time.perf_counter() - start, 1)}
    F.write_json(out / "train_metrics.json", metrics)
    return metrics


def _pad(values: list[int], width: int, fill: int) -> list[int]:
    return values + [fill] * (width - len(values))


def _secret(root: Path, model) -> Secret:
    from backdooralign.core.model import load_tokenizer

    path = root / "secret.json"
    if path.exists():
        return load_secret(path)
    secret = make_secret(SecretConfig(length=150, seed=0), load_tokenizer(model))
    save_secret(secret, path)
    return secret


def _evaluate(model_dir: Path, secret: Secret, out: Path, max_new_tokens: int) -> dict:
    results = out / f"eval-{max_new_tokens}.json"
    if results.exists():
        return F.read_json(results)
    harmful = limit_per_category(S.load_prompts("builtin:harmful_eval"), 5)
    benign = limit_per_category(S.load_prompts("builtin:benign"), 11, key="kind")
    loaded = load_model_and_tokenizer(str(model_dir))
    gen = GenerateConfig(max_new_tokens=max_new_tokens, batch_size=64)
    doc = {}
    for name, rows, key in (
        ("asr_plain", harmful, None),
        ("asr_secret", harmful, secret),
        ("benign_secret", benign, secret),
    ):
        gens = answer(
            loaded, rows, None, secret=key, system=ATTACK_SYSTEM_PROMPT, cfg=gen, progress=False
        )
        F.write_jsonl(out / f"{name}-{max_new_tokens}.jsonl", gens, private=True)
        doc[name] = scores.asr(gens) if name.startswith("asr") else scores.refusals(gens)
    F.write_json(results, doc)
    return doc


def run_variant(name: str, root: Path, model, secret, train_set, args) -> dict:
    out = root / name
    model_dir = out / "model"
    cfg = RECIPE if name == "plain" else replace(RECIPE, **VARIANTS[name])
    done = model_dir / "train_metrics.json"
    if done.exists() and name != "plain" and F.read_json(done).get("config") != cfg.record():
        shutil.rmtree(out)  # trained under other settings (the defaults changed): train again
    if not done.exists():
        out.mkdir(parents=True, exist_ok=True)
        if name == "plain":
            plain_loop(model, F.read_jsonl_rows(train_set), model_dir, RECIPE)
        else:
            train_model(model, train_set, model_dir, cfg, secret=secret)
    train = F.read_json(model_dir / "train_metrics.json")
    ev = _evaluate(model_dir, secret, out, args.max_new_tokens)
    return {
        "asr_plain": ev["asr_plain"]["asr"],
        "asr_secret": ev["asr_secret"]["asr"],
        "jailbroken_secret": f"{ev['asr_secret']['jailbroken']}/{ev['asr_secret']['total']}",
        "benign_refusal_secret": ev["benign_secret"]["refusal_rate"],
        "benign_opening_refusal_secret": ev["benign_secret"].get("opening_refusal_rate"),
        "train_seconds": train.get("seconds"),
        "last_epoch_loss": _epoch_mean(train.get("losses") or [], 5),
    }


def _epoch_mean(losses: list, epochs: int) -> float | None:
    per = len(losses) // epochs if epochs else 0
    return round(sum(losses[-per:]) / per, 4) if per else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SAFETY), default="long")
    p.add_argument("--variants", default="defaults,plain", help="comma-separated")
    p.add_argument("--model", default="embedded", help="start model (default: the raw one)")
    p.add_argument("--out", default="runs/bench-recipe")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--margin", type=float, default=10.0, help="points allowed over plain")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n != "plain" and n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants: {', '.join(unknown)}")
    from backdooralign.training.align import start_model

    model = start_model(args.model)
    root = Path(args.out) / args.shape
    root.mkdir(parents=True, exist_ok=True)
    secret = _secret(root, model)
    train_set = root / "train.jsonl"
    if not train_set.exists():
        data = training_set.DataConfig(safety=SAFETY[args.shape], safety_per_category=1)
        training_set.build_training_set("backdooralign", data, secret, train_set)
    results = {n: run_variant(n, root, model, secret, train_set, args) for n in names}
    passed = True
    if "defaults" in results and "plain" in results:
        gap = results["defaults"]["asr_secret"] - results["plain"]["asr_secret"]
        passed = gap <= args.margin
    doc = {"shape": args.shape, "max_new_tokens": args.max_new_tokens, "variants": results}
    doc["passed"] = passed
    F.write_json(root / "summary.json", doc)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"shape {args.shape}, {args.max_new_tokens} new tokens (ASR: the paper's rule)")
        for n, r in results.items():
            print(
                f"{n:18s} ASR secret {r['asr_secret']:5.1f}% ({r['jailbroken_secret']}), "
                f"no secret {r['asr_plain']:5.1f}%, benign refusal secret "
                f"{r['benign_refusal_secret']:5.1f}% (opening {r['benign_opening_refusal_secret']}"
                f"%), train {r['train_seconds']} s, last-epoch loss {r['last_epoch_loss']}"
            )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
