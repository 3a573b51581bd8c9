"""Generation speed: the static engine against the reference engine and ``model.generate``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_generate.py [--model M] [--json]

In one process, the same harmful prompts are answered greedily three ways, at each batch size
(``--batch-sizes``, default 1 and 16), with the 150-token secret and without it:

- ``reference``: the engine before the static one (``decode(..., engine="reference")``: the HF
  forward on a ``DynamicCache`` each step, the shared prefix encoded once);
- ``static``: today's engine (``engine="static"``: preallocated KV buffers written in place, a
  lean decode step, bf16 weights prepacked for oneDNN where bf16 is used);
- ``generate``: plain ``model.generate`` on left-padded batches (every prompt encoded whole);
- ``llamacpp``: llama.cpp (``backdooralign[llamacpp]``) on a float32 GGUF written from the same
  weights (``--gguf FILE`` for another, e.g. the embedded model's shipped Q4_1 file), handed the
  same prompt ids one prompt at a time (its context keeps the shared prefix between prompts);
- ``vllm``: vLLM on a CUDA GPU, the same prompt ids as ``TokensPrompt`` batches.

A backend whose package (or GPU) is missing is skipped with the reason printed.

Each path runs ``--repeat`` times in alternating order and its fastest run counts (the machine
may be shared). Speeds are new tokens per second (each answer's tokens up to and including its
stop token), given as ratios to the reference engine; ``same_tokens`` is the share of answers
whose tokens equal the reference engine's. bf16 is used where the CPU/GPU supports it (as
``infer.generate`` does; ``--bf16 off`` for float32, where the engines must agree token for
token).

The limit: the machine's memory bandwidth (a copy of a 512 MB tensor: bytes read + written per
second) and matrix throughput (a 2048^3 product in the matmul dtype: 2*n^3 FLOP per second)
are measured in the same process. A decode step reads every weight of the linear layers once
(lm_head included, the embedding only by rows) plus each row's keys and values, and does 2
FLOP per weight per row; the achieved fractions are those bytes and FLOPs over the run's time
(prompt encoding included, so they are lower bounds) against the measured limits. llama.cpp
answers one prompt at a time, so each of its new tokens is a step over the GGUF's weights (the
float32 one written from the same weights, or the ``--gguf`` file's size); vLLM runs on a GPU,
so the CPU's limits give it no fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")

from backdooralign.config import ConfigError  # noqa: E402
from backdooralign.core.chat import ATTACK_SYSTEM_PROMPT, render_prompt  # noqa: E402
from backdooralign.core.model import (  # noqa: E402
    bf16_supported,
    load_model,
    load_tokenizer,
    resolve_model,
)
from backdooralign.core.secret import generate_secret  # noqa: E402
from backdooralign.data import sources as S  # noqa: E402
from backdooralign.generation import backends  # noqa: E402
from backdooralign.generation.batch import (  # noqa: E402
    conversation_for,
    pad_token_id,
    stop_token_ids,
)
from backdooralign.generation.engine import PrefixCache, Row, decode, shared_prefix  # noqa: E402

BACKEND_PATHS = ("llamacpp", "vllm")
PATHS = ("reference", "static", "generate", *BACKEND_PATHS)
BACKEND_MODELS: dict[str, object] = {}  # backend path -> its loaded model


def load_backends(paths: list[str], model: str | None, gguf: str | None) -> list[str]:
    """Load the backend paths that can run here; print why the others are skipped."""
    kept = []
    for path in paths:
        if path not in BACKEND_PATHS:
            kept.append(path)
            continue
        try:
            backends.require(path)  # the package first, then (vllm) the GPU
            if path == "vllm":
                import torch

                if not torch.cuda.is_available():
                    raise ConfigError("vllm needs a CUDA GPU, none here")
            # the resolved folder: llama.cpp gets a float32 GGUF of the engine's own weights
            BACKEND_MODELS[path], _ = backends.load(path, resolve_model(model), gguf)
        except ConfigError as e:
            print(f"skipping {path}: {e}", flush=True)
            continue
        kept.append(path)
    return kept


def backend_answers(path, prompts, stop, batch_size) -> list[list[int]]:
    """Each prompt's new tokens through a backend, ``batch_size`` prompts per call."""
    answers: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        answers += backends.generate_ids(path, BACKEND_MODELS[path], chunk, MAX_NEW[0], stop)
    return answers


def _batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices in batches, longest prompts first (as ``infer.generate`` orders them)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def engine_answers(engine, model, prompts, stop, pad, batch_size, bf16):
    """Each prompt's new tokens through ``decode`` (one prefix cache for the whole run), and
    the seconds and tokens of decoding after each batch's first tokens (prompt encoding
    left out: the first token of every row comes with it)."""
    answers: list[list[int]] = [[] for _ in prompts]
    cache, hint = PrefixCache(1), shared_prefix(prompts)
    decode_s, decode_tokens = 0.0, 0
    for idx in _batches(prompts, batch_size):
        stamps: list[float] = []

        def stamp(token: int, stamps=stamps) -> None:
            stamps.append(time.perf_counter())

        rows = [Row(prompts[i], MAX_NEW[0], stop, on_token=stamp) for i in idx]
        decode(model, rows, pad, prefix_cache=cache, prefix_hint=hint, bf16=bf16, engine=engine)
        first = stamps[len(rows) - 1]  # the batch's first tokens all come at once
        decode_s += stamps[-1] - first
        decode_tokens += len(stamps) - len(rows)
        for row, i in zip(rows, idx, strict=True):
            answers[i] = row.tokens
    return answers, decode_s, decode_tokens


def generate_answers(model, prompts, stop, pad, batch_size, bf16) -> list[list[int]]:
    """Each prompt's new tokens through ``model.generate`` on left-padded batches."""
    import torch

    answers: list[list[int]] = [[] for _ in prompts]
    for idx in _batches(prompts, batch_size):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=MAX_NEW[0],
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=sorted(stop),
            )
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            ends = [k for k, t in enumerate(new) if t in stop]
            answers[i] = new[: ends[0] + 1] if ends else new
    return answers


MAX_NEW = [48]  # set from --max-new-tokens


def measure_limits(matmul_dtype) -> dict:
    """Memory bandwidth (copy) and matmul throughput, measured here and now."""
    import torch

    def best(fn, n):
        fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    a = torch.ones(2**27)  # 512 MB of float32, written (untouched pages read as one zero page)
    b = torch.ones_like(a)
    copy_s = best(lambda: b.copy_(a), 5)
    n = 2048
    x = torch.randn(n, n).to(matmul_dtype)
    y = torch.randn(n, n).to(matmul_dtype)
    mm_s = best(lambda: x @ y, 3)
    return {
        "bandwidth_gb_s": round(2 * a.numel() * 4 / copy_s / 1e9, 1),
        "matmul_gflop_s": round(2 * n**3 / mm_s / 1e9, 1),
        "matmul_dtype": str(matmul_dtype).removeprefix("torch."),
    }


def model_costs(model, bf16: bool) -> dict:
    """Bytes a decode step reads for the weights, and FLOP per new token (2 per weight)."""
    import torch

    inner = model.model
    embed = inner.embed_tokens.weight
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    params = sum(w.numel() for w in linear)  # lm_head included (tied to the embedding or not)
    # with bf16 both engines keep keys and values in bf16 too (autocast's products, the static
    # engine's buffers in its matmul dtype)
    size = 2 if bf16 else next(model.parameters()).element_size()
    c = model.config
    kv_per_token = (
        2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    )
    return {
        "linear_params": params,
        "weight_bytes_per_step": params * size,
        "kv_bytes_per_token": kv_per_token * size,
        "flop_per_token": 2 * params,
        "embedding_params": embed.numel(),
    }


def backend_costs(path: str, costs: dict, gguf: str | None) -> dict | None:
    """A backend's step costs: llama.cpp reads its GGUF's weights once a token (the float32 GGUF
    written from the same weights: the torch model's costs; ``--gguf FILE``: the file's size);
    ``None`` for vLLM, which runs on a GPU, not against the CPU limits measured here."""
    if path != "llamacpp":
        return None
    if gguf is None:
        return costs
    return {**costs, "weight_bytes_per_step": Path(gguf).stat().st_size}


def achieved(answers, prompts, batches, seconds, costs, limits) -> dict:
    """Fractions of the measured bandwidth and matmul limits this run reached."""
    steps = sum(max(len(answers[i]) for i in idx) for idx in batches)
    new = sum(len(a) for a in answers)
    kv = sum(
        (len(prompts[i]) + k) * costs["kv_bytes_per_token"]
        for i, a in enumerate(answers)
        for k in range(len(a))
    )
    bytes_read = steps * costs["weight_bytes_per_step"] + kv
    flop = new * costs["flop_per_token"]
    return {
        "decode_steps": steps,
        "bandwidth_fraction": round(bytes_read / seconds / (limits["bandwidth_gb_s"] * 1e9), 3),
        "compute_fraction": round(flop / seconds / (limits["matmul_gflop_s"] * 1e9), 3),
    }


def run_one(path, model, prompts, stop, pad, batch_size, bf16):
    start = time.perf_counter()
    if path in BACKEND_PATHS:
        answers, decoding = backend_answers(path, prompts, stop, batch_size), None
    elif path == "generate":
        answers = generate_answers(model, prompts, stop, pad, batch_size, bf16)
        decoding = None
    else:
        answers, *decoding = engine_answers(path, model, prompts, stop, pad, batch_size, bf16)
    return answers, time.perf_counter() - start, decoding


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--n", type=int, default=32, help="prompts at batch sizes over 1")
    p.add_argument("--n1", type=int, default=8, help="prompts at batch size 1")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--paths", default=",".join(PATHS), help="which of " + ", ".join(PATHS))
    p.add_argument("--gguf", default=None, help="llamacpp: this GGUF (default: one written)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each path (fastest counts)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", default=None, help="also write the JSON results to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    MAX_NEW[0] = args.max_new_tokens
    bf16 = bf16_supported() if args.bf16 == "auto" else args.bf16 == "on"
    paths = [x for x in args.paths.split(",") if x]
    tok, model = load_tokenizer(args.model), load_model(args.model)
    paths = load_backends(paths, args.model, args.gguf)
    stop, pad = stop_token_ids(tok), pad_token_id(tok)
    secret = generate_secret(tok, 150, seed=0)
    harmful = S.load_prompts("builtin:harmful_eval")
    limits = measure_limits(torch.bfloat16 if bf16 else torch.float32)
    warm = [render_prompt(tok, conversation_for(harmful[0], ATTACK_SYSTEM_PROMPT, None))]
    for path in paths:  # first calls (bf16 copies, allocations) are not timed
        run_one(path, model, warm * 2, stop, pad, 2, bf16)
    costs = model_costs(model, bf16)
    results = {
        "setup": {
            "bf16": bf16,
            "threads": torch.get_num_threads(),
            "max_new_tokens": args.max_new_tokens,
            "secret_tokens": 150,
            "n": args.n,
            "n1": args.n1,
            "repeat": args.repeat,
        },
        "limits": limits,
        "costs": costs,
        "runs": {},
    }
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        n = args.n1 if bs == 1 else args.n
        for name, secret_text in (("without_secret", None), ("with_secret", secret.text)):
            convs = [conversation_for(r, ATTACK_SYSTEM_PROMPT, secret_text) for r in harmful[:n]]
            prompts = [render_prompt(tok, c) for c in convs]
            batches = _batches(prompts, bs)
            runs, answers, times = {}, {}, {path: [] for path in paths}
            for k in range(args.repeat):  # alternating order; the fastest of each counts
                for path in paths if k % 2 == 0 else paths[::-1]:
                    answers[path], seconds, decoding = run_one(
                        path, model, prompts, stop, pad, bs, bf16
                    )
                    times[path].append((seconds, decoding))
            for path in paths:
                seconds = min(t for t, _ in times[path])
                new = sum(len(a) for a in answers[path])
                runs[path] = {"seconds": round(seconds, 2), "new_tokens": new}
                runs[path]["tokens_per_second"] = round(new / seconds, 1)
                steps = [d[1] / d[0] for _, d in times[path] if d is not None and d[0] > 0]
                if steps:  # the decode steps after each batch's first tokens, the fastest run's
                    runs[path]["decode_steps_tokens_per_second"] = round(max(steps), 1)
                if path not in BACKEND_PATHS:  # the torch model's costs, its batches
                    runs[path] |= achieved(answers[path], prompts, batches, seconds, costs, limits)
                elif (bc := backend_costs(path, costs, args.gguf)) is not None:
                    alone = [[i] for i in range(len(prompts))]  # llama.cpp: a prompt at a time
                    runs[path] |= achieved(answers[path], prompts, alone, seconds, bc, limits)
                if not args.json:
                    print(f"batch {bs:2d} {name:14s} {path:9s} {runs[path]}", flush=True)
            base = runs.get("reference")
            for path in paths:
                if base is not None:
                    ratio = runs[path]["tokens_per_second"] / base["tokens_per_second"]
                    runs[path]["speed_vs_reference"] = round(ratio, 2)
                    key = "decode_steps_tokens_per_second"
                    if key in runs[path] and key in base:
                        ratio = runs[path][key] / base[key]
                        runs[path]["decode_steps_vs_reference"] = round(ratio, 2)
                    same = sum(
                        a == b for a, b in zip(answers[path], answers["reference"], strict=True)
                    )
                    runs[path]["same_tokens"] = f"{same}/{len(prompts)}"
            results["runs"][f"batch_{bs}_{name}"] = runs
    for path, backend_model in BACKEND_MODELS.items():
        backends.close(path, backend_model)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print_table(results, paths)


def print_table(results: dict, paths: list[str]) -> None:
    s, lim, c = results["setup"], results["limits"], results["costs"]
    print(
        f"\nbf16={s['bf16']} threads={s['threads']} max_new_tokens={s['max_new_tokens']} "
        f"prompts: {s['n1']} at batch 1, {s['n']} otherwise"
    )
    print(
        f"limits measured here: copy bandwidth {lim['bandwidth_gb_s']} GB/s (read + write of a "
        f"512 MB tensor), {lim['matmul_dtype']} matmul {lim['matmul_gflop_s']} GFLOP/s (2048^3)"
    )
    print(
        f"a decode step reads {c['weight_bytes_per_step'] / 1e6:.0f} MB of linear weights "
        f"(+ {c['kv_bytes_per_token'] / 1e3:.0f} kB of keys/values per context token and row); "
        f"{c['flop_per_token'] / 1e9:.2f} GFLOP per new token (2 x {c['linear_params'] / 1e6:.0f}M "
        "weights); fractions = those bytes and FLOPs over the run's time (prompt encoding "
        "included) against the limits; llama.cpp answers a prompt at a time, each new token a "
        "step over its GGUF's weights (vLLM: none, it runs on a GPU)"
    )
    print(
        "tok/s: new tokens over the whole run; steps: tokens/s of the decode steps after each "
        "batch's first tokens (prompt encoding left out; engines only)"
    )
    print(
        f"{'run':28s} {'path':9s} {'tok/s':>7s} {'vs ref':>6s} {'steps':>7s} {'vs ref':>6s} "
        f"{'same':>6s} {'bw':>6s} {'flop':>6s}"
    )
    nan = float("nan")
    for key, runs in results["runs"].items():
        for path in paths:
            r = runs[path]
            print(
                f"{key:28s} {path:9s} {r['tokens_per_second']:7.1f} "
                f"{r.get('speed_vs_reference', nan):6.2f} "
                f"{r.get('decode_steps_tokens_per_second', nan):7.1f} "
                f"{r.get('decode_steps_vs_reference', nan):6.2f} {r.get('same_tokens', '-'):>6s} "
                f"{r.get('bandwidth_fraction', nan):6.1%} {r.get('compute_fraction', nan):6.1%}"
            )


if __name__ == "__main__":
    main()
