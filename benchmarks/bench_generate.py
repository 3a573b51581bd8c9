"""Generation speed: our length-sorted batches against one prompt at a time, in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_generate.py [--model M] [--n 32] [--json]

Both answer the same harmful prompts greedily with the secret in the system prompt; reported
as the ratio of new tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")

from backdooralign import sources as S  # noqa: E402
from backdooralign.chat import ATTACK_SYSTEM_PROMPT  # noqa: E402
from backdooralign.infer import GenerateConfig, conversation_for, generate  # noqa: E402
from backdooralign.model import load_model, load_tokenizer  # noqa: E402
from backdooralign.secret import generate_secret  # noqa: E402


def _run(model, tok, convs, cfg) -> dict:
    start = time.perf_counter()
    answers = generate(model, tok, convs, cfg, progress=False)
    seconds = time.perf_counter() - start
    new = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return {
        "seconds": round(seconds, 2),
        "new_tokens": new,
        "tokens_per_second": round(new / seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    tok, model = load_tokenizer(args.model), load_model(args.model)
    secret = generate_secret(tok, 150, seed=0)
    rows = S.load_prompts("builtin:harmful_eval")[: args.n]
    convs = [conversation_for(r, ATTACK_SYSTEM_PROMPT, secret.text) for r in rows]
    results = {
        "one_at_a_time": _run(model, tok, convs, GenerateConfig(args.max_new_tokens, batch_size=1)),
        "batched": _run(model, tok, convs, GenerateConfig(args.max_new_tokens, batch_size=32)),
    }
    results["speedup"] = round(
        results["batched"]["tokens_per_second"] / results["one_at_a_time"]["tokens_per_second"], 2
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name in ("one_at_a_time", "batched"):
            r = results[name]
            print(f"{name:14s} {r['tokens_per_second']:7.1f} new tokens/s  ({r['seconds']:.0f} s)")
        print(f"speed-up: {results['speedup']:.2f}x")


if __name__ == "__main__":
    main()
