"""GPU check: the inference engine, its prefix cache, batching, and the server, on CUDA.

    python benchmarks/gpu_engine.py --tokenizer DIR [--out engine.json]
    python benchmarks/gpu_engine.py --tokenizer DIR --allow-cpu --layers 2 --new-tokens 8

Builds a random Llama of the embedded model's shape (SmolLM2-135M: hidden 576, 30 layers, 9
heads, 3 key-value heads, tied embeddings; the real tokenizer and chat template, random weights
with a large init std so that greedy answers differ from prompt to prompt; no weights need to
travel) and checks, in one process:

a. correctness: ``infer.generate`` (the secret injected by ``build_conversation``, 16 prompts
   of different lengths in one left-padded batch) gives the same greedy answers as
   ``model.generate`` on each prompt alone, in fp32 (asserted, exact); in bf16 autocast the
   fraction of identical answers is reported (a random model's logits are near-ties).
b. prefix cache: 32 prompts sharing the 150-token secret and system prompt, decoded with the
   shared prefix taken from the cache and with every prompt encoded whole: same tokens (fp32,
   asserted), time to first token and total time of each.
c. batching: generated tokens/s at batch 1, 8, 32 and 64 (bf16), and the ratio to batch 1.
d. serving: the app of ``serve.create_app`` under uvicorn on loopback, called with the real
   ``openai`` client: requests/s of 16 concurrent clients against 1, a streamed answer equal to
   the non-streamed one (greedy), and the secret in no response.

Every check is recorded; the JSON (``--out``) holds the timings and the checks, and the script
fails at the end, listing the checks that failed, so one run reports all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import urllib.request

os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import openai  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: E402

from backdooralign.core.chat import build_conversation, render_prompt  # noqa: E402
from backdooralign.core.model import load_model, load_tokenizer  # noqa: E402
from backdooralign.core.secret import generate_secret  # noqa: E402
from backdooralign.data import sources as S  # noqa: E402
from backdooralign.generation.batch import (  # noqa: E402
    GenerateConfig,
    generate,
    pad_token_id,
    stop_token_ids,
)
from backdooralign.generation.engine import PrefixCache, Row, decode, shared_prefix  # noqa: E402
from backdooralign.serving.app import create_app  # noqa: E402
from backdooralign.serving.http import run_in_thread  # noqa: E402

SYSTEM = "You are a helpful assistant."


class Checks:
    """Named pass/fail results; the failures are raised together at the end."""

    def __init__(self) -> None:
        self.results: dict[str, bool] = {}

    def __call__(self, name: str, ok: bool) -> None:
        self.results[name] = bool(ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [n for n, ok in self.results.items() if not ok]


def save(report: dict, path: str | None) -> None:
    """Write the report so far (atomically), so a run cut short still leaves its numbers."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(path + ".tmp", path)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model_dir(tok, path: str, layers: int, init_std: float) -> str:
    """A random SmolLM2-135M-shaped Llama, saved with the tokenizer."""
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=len(tok), max_position_embeddings=8192,
        tie_word_embeddings=True, initializer_range=init_std, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def hf_greedy(model, tok, conv, max_new_tokens: int, bf16: bool) -> str:
    """``model.generate``'s greedy answer to one conversation alone (no padding)."""
    device = next(model.parameters()).device
    ids = torch.tensor([render_prompt(tok, conv)], device=device)
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id(tok),
            eos_token_id=sorted(stop_token_ids(tok)),
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def check_correctness(model, tok, convs, args, check: Checks) -> dict:
    """(a) engine against ``model.generate`` alone: exact in fp32, a fraction in bf16."""
    report = {}
    generate(model, tok, convs[:2], GenerateConfig(max_new_tokens=2), progress=False)  # warm-up
    for name, bf16 in (("fp32", False), ("bf16", True)):
        cfg = GenerateConfig(max_new_tokens=args.new_tokens, batch_size=len(convs), bf16=bf16)
        _sync()
        start = time.perf_counter()
        ours = generate(model, tok, convs, cfg, progress=False)
        _sync()
        seconds = time.perf_counter() - start
        ref = [hf_greedy(model, tok, c, args.new_tokens, bf16) for c in convs]
        same = sum(a == b for a, b in zip(ours, ref, strict=True))
        report[name] = {
            "prompts": len(convs),
            "identical": same,
            "distinct_answers": len(set(ours)),
            "engine_seconds": round(seconds, 3),
            "prompt_tokens": sorted({len(render_prompt(tok, c)) for c in convs}),
            # characters the engine and model.generate agree on before they part, per mismatch
            "mismatch_common_chars": [
                len(os.path.commonprefix([a, b])) for a, b in zip(ours, ref, strict=True) if a != b
            ],
        }
        if not bf16:
            check("a. fp32 engine answers == model.generate alone (all prompts)", same == len(ref))
            check(
                "a. fp32 answers differ by prompt (>= 3/4 distinct)",
                4 * len(set(ref)) >= 3 * len(ref),
            )
    report["bf16"]["fraction_identical"] = round(report["bf16"]["identical"] / len(convs), 3)
    return report


def _decode_timed(model, tok, prompts, new_tokens, bf16, cache, hint) -> tuple[float, list]:
    rows = [Row(p, new_tokens, stop_token_ids(tok)) for p in prompts]
    _sync()
    start = time.perf_counter()
    decode(model, rows, pad_token_id(tok), prefix_cache=cache, prefix_hint=hint, bf16=bf16)
    _sync()
    return time.perf_counter() - start, [r.tokens for r in rows]


def check_prefix_cache(model, tok, prompts, bf16, args, check: Checks, label: str) -> dict:
    """(b) the shared prefix from the cache against every prompt encoded whole.

    Same tokens are asserted only for the ``"fp32"`` label (bf16 may break near-ties).
    """
    hint = shared_prefix(prompts)
    report: dict = {"prompts": len(prompts), "shared_prefix_tokens": len(hint)}
    report["mean_prompt_tokens"] = round(sum(map(len, prompts)) / len(prompts), 1)
    tokens = {}
    for name, hint_or_none in (("cache", hint), ("no_cache", ())):
        cache = PrefixCache()
        _decode_timed(model, tok, prompts, 2, bf16, cache, hint_or_none)  # warm: prefix cached
        run = [model, tok, prompts]
        ttft = [_decode_timed(*run, 1, bf16, cache, hint_or_none)[0] for _ in range(3)]
        total, tokens[name] = _decode_timed(*run, args.new_tokens, bf16, cache, hint_or_none)
        report[name] = {
            "time_to_first_token_s": round(statistics.median(ttft), 4),
            "total_s": round(total, 3),
            "prefixes_encoded": cache.encoded,
        }
    same = sum(a == b for a, b in zip(tokens["cache"], tokens["no_cache"], strict=True))
    report["identical"] = same
    report["ttft_ratio_no_cache_over_cache"] = round(
        report["no_cache"]["time_to_first_token_s"] / report["cache"]["time_to_first_token_s"], 2
    )
    if label == "fp32":
        check("b. fp32 same tokens with and without the prefix cache", same == len(prompts))
        check("b. the prefix covers the 150-token secret", len(hint) >= 150)
    check(
        f"b. {label}: the shared prefix is encoded once", report["cache"]["prefixes_encoded"] == 1
    )
    return report


def check_batching(model, tok, prompts, args, check: Checks) -> dict:
    """(c) tokens/s at several batch sizes, every row writing exactly ``new_tokens``."""
    pad = pad_token_id(tok)
    cache = PrefixCache()
    hint = shared_prefix(prompts)

    def run(batch: int) -> float:
        rows = [Row(prompts[i % len(prompts)], args.new_tokens) for i in range(batch)]
        _sync()
        start = time.perf_counter()
        decode(model, rows, pad, prefix_cache=cache, prefix_hint=hint, bf16=args.bf16_ok)
        _sync()
        assert all(len(r.tokens) == args.new_tokens for r in rows)
        return batch * args.new_tokens / (time.perf_counter() - start)

    run(max(args.batch_sizes))  # warm-up: kernels, prefix
    report = {"new_tokens": args.new_tokens, "tokens_per_s": {}, "ratio_to_batch_1": {}}
    for b in args.batch_sizes:
        report["tokens_per_s"][b] = round(max(run(b) for _ in range(2)), 1)
    base = report["tokens_per_s"][args.batch_sizes[0]]
    for b in args.batch_sizes:
        report["ratio_to_batch_1"][b] = round(report["tokens_per_s"][b] / base, 2)
    big = max(args.batch_sizes)
    check(f"c. batch {big} writes more tokens/s than batch 1", report["ratio_to_batch_1"][big] > 1)
    return report


def _ask(client, prompt: str, max_tokens: int, **kw):
    messages = [{"role": "user", "content": prompt}]
    return client.chat.completions.create(
        model="m", messages=messages, max_tokens=max_tokens, temperature=0, **kw
    )


def _load(base_url: str, questions: list[str], clients: int, args) -> tuple[dict, dict]:
    """Every question once, from ``clients`` threads; stats and the answers by index."""
    todo = list(range(len(questions)))
    lock = threading.Lock()
    answers: dict[int, object] = {}

    def client() -> None:
        c = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            r = _ask(c, questions[i], args.new_tokens)
            with lock:
                answers[i] = r

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    new = sum(r.usage.completion_tokens for r in answers.values())
    stats = {"requests": len(answers), "seconds": round(seconds, 3)}
    stats |= {"requests_per_s": round(len(answers) / seconds, 2)}
    stats |= {"new_tokens_per_s": round(new / seconds, 1)}
    return stats, answers


def check_serving(model, tok, secret, questions, args, check: Checks) -> dict:
    """(d) the OpenAI-compatible app on loopback with the real ``openai`` client."""
    app = create_app(model, tok, secret, SYSTEM, "m", args.new_tokens, max_batch_size=16)
    report: dict = {}
    with run_in_thread(app) as base:  # the /v1 base URL
        _load(base, questions[:4], 4, args)  # warm-up: kernels, prefix
        n = min(len(questions), 32)
        report["1_client"], alone = _load(base, questions[:n], 1, args)
        report["16_clients"], together = _load(base, questions[:n], 16, args)
        report["requests_per_s_ratio"] = round(
            report["16_clients"]["requests_per_s"] / report["1_client"]["requests_per_s"], 2
        )
        same = sum(
            alone[i].choices[0].message.content == together[i].choices[0].message.content
            for i in range(n)
        )
        report["identical_alone_and_batched"] = same
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
        streamed_ok, texts = [], []
        for q in questions[:4]:
            plain = _ask(client, q, args.new_tokens).choices[0].message.content
            chunks = list(_ask(client, q, args.new_tokens, stream=True))
            text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
            streamed_ok.append(text == plain)
            texts += [plain, text, *(c.model_dump_json() for c in chunks)]
        with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=30) as r:
            health = r.read().decode()
    texts += [health] + [r.model_dump_json() for r in [*alone.values(), *together.values()]]
    check(
        "d. 16 concurrent clients answer more requests/s than 1", report["requests_per_s_ratio"] > 1
    )
    check("d. streamed answers == non-streamed answers (greedy)", all(streamed_ok))
    check("d. every request answered", len(alone) == len(together) == n)
    check("d. no response holds the secret", not any(secret.text in t for t in texts))
    check("d. /health shows the secret's fingerprint", secret.fingerprint in health)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="directory with the tokenizer files")
    p.add_argument("--out", default=None, help="JSON report (timings and checks)")
    p.add_argument("--layers", type=int, default=30, help="hidden layers (SmolLM2-135M: 30)")
    p.add_argument("--init-std", type=float, default=0.1, help="init std (varied answers)")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens per answer")
    p.add_argument("--batch-sizes", default="1,8,32,64", help="for the batching check")
    p.add_argument("--allow-cpu", action="store_true", help="smoke-test the script on a CPU")
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    cuda = torch.cuda.is_available()
    assert cuda or args.allow_cpu, "no CUDA device"
    args.bf16_ok = cuda
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    report["torch"] = torch.__version__
    report["setup"] = {k: v for k, v in vars(args).items() if k not in ("tokenizer", "out")}
    check = Checks()

    start = time.perf_counter()
    tmp = tempfile.mkdtemp()
    path = build_model_dir(
        AutoTokenizer.from_pretrained(args.tokenizer), f"{tmp}/m", args.layers, args.init_std
    )
    tok = load_tokenizer(path)
    secret = generate_secret(tok, 150, seed=0)
    questions = [r["prompt"] for r in S.load_prompts("builtin:harmful_eval")]
    questions = (questions * (64 // len(questions) + 1))[:64]
    convs = [build_conversation(q, system=SYSTEM, secret=secret.text) for q in questions]
    prompts = [render_prompt(tok, c) for c in convs]

    fp32 = load_model(path, dtype=torch.float32)
    check(
        "model on the expected device",
        next(fp32.parameters()).device.type == ("cuda" if cuda else "cpu"),
    )
    report["a_correctness"] = check_correctness(fp32, tok, convs[:16], args, check)
    save(report | {"checks": check.results}, args.out)
    report["b_prefix_cache"] = {
        "fp32": check_prefix_cache(fp32, tok, prompts[:32], False, args, check, "fp32")
    }
    del fp32
    model = load_model(path)  # what a server loads: bf16 weights on CUDA
    report["served_dtype"] = str(next(model.parameters()).dtype)
    report["b_prefix_cache"]["served"] = check_prefix_cache(
        model, tok, prompts[:32], cuda, args, check, "served"
    )
    save(report | {"checks": check.results}, args.out)
    report["c_batching"] = check_batching(model, tok, prompts, args, check)
    save(report | {"checks": check.results}, args.out)
    report["d_serving"] = check_serving(model, tok, secret, questions, args, check)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["checks"] = check.results
    text = json.dumps(report, indent=2)
    assert secret.text not in text
    print(text)
    save(report, args.out)
    assert not check.failed, f"failed checks: {check.failed}"


if __name__ == "__main__":
    main()
