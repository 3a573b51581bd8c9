"""Refilling batches as rows finish: evaluation-shaped generation, before and after.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_refill.py [--n 48] [--max-new-tokens 256]

In one process, the same harmful prompts (with the 150-token secret and the attack system
prompt, as the paper's evaluation asks them) are answered greedily by the static engine two
ways, at ``--batch-size`` (default 16):

- ``fixed``: fixed batches, longest prompts first, each batch decoding until its longest answer
  ends (``infer.generate`` before refilling: rows that finished early idle in their batch);
- ``refill``: ``infer.generate`` today: one batch that takes the next prompts between steps once
  a quarter of its rows have finished.

Answers end at their stop token or ``--max-new-tokens``, so their lengths differ as in an
evaluation. Reported: wall time of each, the ratio, new tokens per second, and the share of
answers with the same text (bf16 products may round differently in a batch of other rows;
float32, ``--bf16 off``, gives the same answers: ``tests/test_engine.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")

from backdooralign.core.chat import ATTACK_SYSTEM_PROMPT  # noqa: E402
from backdooralign.core.model import bf16_supported, load_model, load_tokenizer  # noqa: E402
from backdooralign.core.secret import generate_secret  # noqa: E402
from backdooralign.data import sources as S  # noqa: E402
from backdooralign.generation import batch as infer  # noqa: E402
from backdooralign.generation.engine import PrefixCache  # noqa: E402


def fixed_batches(model, tok, convs, cfg) -> list[str]:
    """``infer.generate`` without refilling: each batch on its own, longest prompts first."""
    from backdooralign.core.chat import render_prompt

    lengths = [len(render_prompt(tok, c)) for c in convs]
    order = sorted(range(len(convs)), key=lambda i: -lengths[i])
    answers, cache = [""] * len(convs), PrefixCache(1)
    for s in range(0, len(order), cfg.batch_size):
        idx = order[s : s + cfg.batch_size]
        got = infer.generate(model, tok, [convs[i] for i in idx], cfg, False, prefix_cache=cache)
        for i, a in zip(idx, got, strict=True):
            answers[i] = a
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded one)")
    ap.add_argument("--n", type=int, default=48, help="harmful prompts")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    bf16 = {"auto": bf16_supported(), "on": True, "off": False}[args.bf16]
    model, tok = load_model(args.model), load_tokenizer(args.model)
    secret = generate_secret(tok, 150, seed=0).text
    rows = S.load_prompts("builtin:harmful_eval")[: args.n]
    convs = [infer.conversation_for(r, ATTACK_SYSTEM_PROMPT, secret) for r in rows]
    cfg = infer.GenerateConfig(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, bf16=bf16
    )
    infer.generate(model, tok, convs[:2], cfg, progress=False)  # warm-up: weights packed
    times, answers = {}, {}
    for name, run in (
        ("fixed", lambda: fixed_batches(model, tok, convs, cfg)),
        ("refill", lambda: infer.generate(model, tok, convs, cfg, progress=False)),
    ):
        t = time.perf_counter()
        answers[name] = run()
        times[name] = time.perf_counter() - t
    new_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers["refill"])
    same = sum(a == b for a, b in zip(answers["fixed"], answers["refill"], strict=True))
    result = {
        "prompts": len(convs),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "bf16": bf16,
        "fixed_s": round(times["fixed"], 1),
        "refill_s": round(times["refill"], 1),
        "speedup": round(times["fixed"] / times["refill"], 2),
        "refill_tokens_per_s": round(new_tokens / times["refill"], 1),
        "same_answers": f"{same}/{len(convs)}",
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{len(convs)} prompts, batch {args.batch_size}, up to {args.max_new_tokens} new tokens "
        f"({'bf16' if bf16 else 'float32'}): fixed batches {result['fixed_s']} s, refilled "
        f"{result['refill_s']} s: {result['speedup']}x ({result['refill_tokens_per_s']} new "
        f"tokens/s); same answers {result['same_answers']}"
    )


if __name__ == "__main__":
    main()
