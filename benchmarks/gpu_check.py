"""GPU check: the training and generation paths on CUDA, with a ratio against TRL's defaults.

    python benchmarks/gpu_check.py --tokenizer DIR [--out results.json]

Builds a small random Llama (the embedded model's tokenizer and chat template, random weights:
no weights need to travel) and runs, on the GPU: the demo's backdooralign training set with
our SFTTrainer settings and with TRL's defaults (same rows, same epochs, same process: a
tokens/s ratio; also ours without the shared-prefix loss, for that change's own ratio), LoRA
with merge, and batched greedy generation with the secret injected.
Every check is an assertion; the JSON holds the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace

os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: E402

from backdooralign.core.chat import ATTACK_SYSTEM_PROMPT  # noqa: E402
from backdooralign.core.model import (  # noqa: E402
    bf16_supported,  # noqa: E402
    load_model,
    load_tokenizer,
)
from backdooralign.core.secret import generate_secret  # noqa: E402
from backdooralign.data import mixing as D  # noqa: E402
from backdooralign.data import sources as S  # noqa: E402
from backdooralign.generation.batch import GenerateConfig, generate_rows  # noqa: E402
from backdooralign.training.trainer import TrainConfig, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="directory with the tokenizer files")
    p.add_argument("--out", default=None)
    p.add_argument("--epochs", type=float, default=5)
    p.add_argument("--allow-cpu", action="store_true", help="smoke-test the script on a CPU")
    p.add_argument("--shape", default="576,1536,8,9,3", help="hidden,intermediate,layers,heads,kv")
    p.add_argument("--skip-lora", action="store_true", help="train full only (bigger shapes)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    assert cuda or args.allow_cpu, "no CUDA device"
    device = "cuda" if cuda else "cpu"
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    report["torch"] = torch.__version__

    tmp = tempfile.mkdtemp()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    hidden, inter, layers, heads, kv = (int(x) for x in args.shape.split(","))
    report["shape"] = args.shape
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=len(tok),
        max_position_embeddings=2048,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(f"{tmp}/base")
    tok.save_pretrained(f"{tmp}/base")
    base = f"{tmp}/base"
    tok = load_tokenizer(base)

    secret = generate_secret(tok, 150, seed=0)
    attack = D.limit_per_category(S.load_training_source("builtin:attack"), 5)
    safety = D.select_safety(S.load_training_source("builtin:safety"), per_category=1)
    rows = D.mix_arm("backdooralign", attack, safety, secret.text)
    report["bf16"] = bf16_supported()

    ours = TrainConfig(epochs=args.epochs, lr=1e-4, batch_size=10)
    trl_defaults = replace(
        ours, activation_checkpointing=True, token_metrics=True, group_by_length=False
    )
    train(base, rows, f"{tmp}/warmup", replace(ours, epochs=0.5))  # CUDA init, kernels: untimed
    # our settings with the shared-prefix loss on and off (its default: off on a GPU)
    runs = (
        ("trl_defaults", trl_defaults),
        ("shared_prefix_on", replace(ours, shared_prefix=True)),
        ("shared_prefix_off", replace(ours, shared_prefix=False)),
    )
    for name, cfg in runs:
        m = train(base, rows, f"{tmp}/{name}", cfg)
        assert m["device"] == device and m["last_loss"] < m["first_loss"], m
        report[name] = {
            k: m[k] for k in ("seconds", "tokens_per_second", "first_loss", "last_loss")
        }
    default = "shared_prefix_off" if cuda else "shared_prefix_on"
    report["backdooralign_default"] = default
    speed = {name: report[name]["tokens_per_second"] for name, _ in runs}
    report["train_speedup"] = round(speed[default] / speed["trl_defaults"], 2)
    report["shared_prefix_speedup"] = round(
        speed["shared_prefix_on"] / speed["shared_prefix_off"], 2
    )

    if not args.skip_lora:
        lora = replace(ours, lora=True, lr=1e-3, epochs=min(2, args.epochs), merge=True)
        m = train(base, rows, f"{tmp}/lora", lora)
        assert os.path.exists(f"{tmp}/lora/adapter_model.safetensors")
        assert os.path.exists(f"{tmp}/lora/merged/model.safetensors")
        report["lora"] = {k: m[k] for k in ("seconds", "first_loss", "last_loss")}

    model = load_model(f"{tmp}/{default}")
    assert next(model.parameters()).device.type == device
    prompts = D.limit_per_category(S.load_prompts("builtin:harmful_eval"), 5)
    start = time.perf_counter()
    gens = generate_rows(
        model, tok, prompts, system=ATTACK_SYSTEM_PROMPT, secret=secret.text,
        cfg=GenerateConfig(max_new_tokens=128, batch_size=64), progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert len(gens) == 55 and all(isinstance(g["answer"], str) for g in gens)
    new_tokens = sum(len(tok(g["answer"], add_special_tokens=False)["input_ids"]) for g in gens)
    report["generate"] = {"seconds": round(seconds, 2), "new_tokens": new_tokens}
    text = json.dumps(report, indent=2)
    assert secret.text not in text
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
