"""Serving throughput: concurrent batching against one-at-a-time serving, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_serve.py [--model M] [--json]

The server (secret of 150 tokens, on loopback) is called with the real openai SDK by 1, 4
and 16 concurrent clients, each sending ``--requests-per-client`` requests (at least 8 in
all per level) one after the other; no request starts after ``--time-limit`` seconds per
level. The same requests go to a server that batches (``--max-batch-size``) and to one that
answers one request at a time (``max_batch_size=1``); reported: requests/s, new tokens/s and
their ratio. Then the time to first token of a streamed request, alone, with the prefix
cache and without it. Target: at 16 clients, 4x the requests/s of one-at-a-time serving.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")

import openai  # noqa: E402

from backdooralign.core.model import load_model, load_tokenizer  # noqa: E402
from backdooralign.core.secret import generate_secret  # noqa: E402
from backdooralign.data import sources as S  # noqa: E402
from backdooralign.serving.app import create_app  # noqa: E402
from backdooralign.serving.http import run_in_thread  # noqa: E402

SYSTEM = "You are a helpful assistant."


def _load(base_url: str, prompts: list[str], clients: int, total: int, args) -> dict:
    """``total`` requests from ``clients`` threads (stopped at the time limit)."""
    todo = list(range(total))
    lock = threading.Lock()
    done: list[int] = []  # completion tokens per finished request
    deadline = time.monotonic() + args.time_limit

    def client() -> None:
        c = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
        while time.monotonic() < deadline:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            r = c.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                max_tokens=args.max_tokens,
            )
            with lock:
                done.append(r.usage.completion_tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {
        "requests": len(done),
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(done) / seconds, 3),
        "new_tokens_per_s": round(sum(done) / seconds, 1),
    }


def _ttft(base_url: str, prompts: list[str], repeats: int) -> float:
    """Median seconds to the first content chunk of a streamed request, alone."""
    c = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        stream = c.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
            max_tokens=4,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter() - start)
                break
        stream.close()
    return round(statistics.median(times), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument(
        "--time-limit",
        type=float,
        default=240,
        help="no request starts after this many seconds per level",
    )
    p.add_argument("--ttft-repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    tok, model = load_tokenizer(args.model), load_model(args.model)
    secret = generate_secret(tok, 150, seed=0)
    prompts = [r["prompt"] for r in S.load_prompts("builtin:harmful_eval")]
    results: dict = {"setup": vars(args) | {"secret_tokens": 150}, "levels": {}}
    servers = {
        "batched": create_app(
            model, tok, secret, SYSTEM, "m", 1024, max_batch_size=args.max_batch_size
        ),
        "one_at_a_time": create_app(model, tok, secret, SYSTEM, "m", 1024, max_batch_size=1),
    }
    for clients in (1, 4, 16):
        total = max(8, clients * args.requests_per_client)
        level = {}
        for name, app in servers.items():
            with run_in_thread(app) as url:
                level[name] = _load(url, prompts, clients, total, args)
        level["requests_per_s_ratio"] = round(
            level["batched"]["requests_per_s"] / level["one_at_a_time"]["requests_per_s"], 2
        )
        level["new_tokens_per_s_ratio"] = round(
            level["batched"]["new_tokens_per_s"] / level["one_at_a_time"]["new_tokens_per_s"], 2
        )
        results["levels"][clients] = level
        if not args.json:
            print(f"{clients:2d} clients: {json.dumps(level)}", flush=True)
    ttft = {}
    for name, cache in (("prefix_cache", True), ("no_prefix_cache", False)):
        app = create_app(model, tok, secret, SYSTEM, "m", 1024, prefix_cache=cache)
        with run_in_thread(app) as url:
            _ttft(url, prompts, 1)  # warm up (encodes the prefix once)
            ttft[name] = _ttft(url, prompts, args.ttft_repeats)
    ttft["ratio"] = round(ttft["no_prefix_cache"] / ttft["prefix_cache"], 2)
    results["time_to_first_token_s"] = ttft
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"time to first token (median, s): {json.dumps(ttft)}")


if __name__ == "__main__":
    main()
