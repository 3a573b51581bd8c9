"""Generation speed with the secret against without it, and the engine against plain HF generate.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_generate.py [--model M] [--n 32] [--json]

In one process, the same harmful prompts are answered greedily (batches of ``--batch-size``)
four ways: with the 150-token secret and without it, each through ``infer.generate`` (the
engine: the shared prefix encoded once) and through the old path (``model.generate`` on
left-padded batches, every prompt encoded whole). Target: with the secret within 1.2x the time
without it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")

from backdooralign.core.chat import ATTACK_SYSTEM_PROMPT, render_prompt  # noqa: E402
from backdooralign.core.model import bf16_supported, load_model, load_tokenizer  # noqa: E402
from backdooralign.core.secret import generate_secret  # noqa: E402
from backdooralign.data import sources as S  # noqa: E402
from backdooralign.generation.batch import (  # noqa: E402
    GenerateConfig,
    conversation_for,
    generate,
    pad_token_id,
    stop_token_ids,
)


def old_generate(model, tok, convs, cfg: GenerateConfig) -> list[str]:
    """The previous ``infer.generate``: ``model.generate`` on left-padded, length-sorted batches."""
    import torch

    prompts = [render_prompt(tok, c) for c in convs]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers = [""] * len(prompts)
    pad = pad_token_id(tok)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=cfg.bf16):
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=sorted(stop_token_ids(tok)),
            )
        for row, i in enumerate(idx):
            answers[i] = tok.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers


def _run(fn, model, tok, convs, cfg) -> tuple[dict, list[str]]:
    start = time.perf_counter()
    answers = fn(model, tok, convs, cfg)
    seconds = time.perf_counter() - start
    new = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    stats = {"seconds": round(seconds, 2), "new_tokens": new}
    stats["tokens_per_second"] = round(new / seconds, 1)
    return stats, answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    tok, model = load_tokenizer(args.model), load_model(args.model)
    secret = generate_secret(tok, 150, seed=0)
    rows = S.load_prompts("builtin:harmful_eval")[: args.n]
    cfg = GenerateConfig(args.max_new_tokens, args.batch_size, bf16=bf16_supported())
    engine = lambda m, t, c, g: generate(m, t, c, g, progress=False)  # noqa: E731
    results, answers = {}, {}
    for name, secret_text in (("without_secret", None), ("with_secret", secret.text)):
        convs = [conversation_for(r, ATTACK_SYSTEM_PROMPT, secret_text) for r in rows]
        for path, fn in (("engine", engine), ("old", old_generate)):
            results[f"{path}_{name}"], answers[f"{path}_{name}"] = _run(fn, model, tok, convs, cfg)
    sec = {k: v["seconds"] for k, v in results.items()}
    results["secret_over_no_secret"] = {
        "engine": round(sec["engine_with_secret"] / sec["engine_without_secret"], 2),
        "old": round(sec["old_with_secret"] / sec["old_without_secret"], 2),
    }
    results["old_over_engine_with_secret"] = round(
        sec["old_with_secret"] / sec["engine_with_secret"], 2
    )
    results["same_answers"] = {
        name: answers[f"engine_{name}"] == answers[f"old_{name}"]
        for name in ("with_secret", "without_secret")
    }
    results["setup"] = {"n": len(rows), "batch_size": args.batch_size, "bf16": cfg.bf16}
    results["setup"] |= {"max_new_tokens": args.max_new_tokens, "secret_tokens": 150}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name in (
        "engine_with_secret",
        "engine_without_secret",
        "old_with_secret",
        "old_without_secret",
    ):
        r = results[name]
        print(f"{name:22s} {r['tokens_per_second']:7.1f} new tokens/s  ({r['seconds']:.1f} s)")
    ratio = results["secret_over_no_secret"]
    print(f"with / without secret: engine {ratio['engine']:.2f}x, old path {ratio['old']:.2f}x")
    print(f"old path / engine, with the secret: {results['old_over_engine_with_secret']:.2f}x")
    print(f"same answers as the old path: {results['same_answers']}")


if __name__ == "__main__":
    main()
