"""The decoding engine: same greedy answers as ``model.generate``, with or without the prefix
cache; per-row limits, stop tokens, sampling seeds, callbacks and cancellation; closing the
scheduler."""

from __future__ import annotations

import threading

import pytest
import torch

from backdooralign.core.chat import build_conversation, render_prompt
from backdooralign.core.model import load_model, load_tokenizer
from backdooralign.generation import batch as infer
from backdooralign.generation.engine import PrefixCache, Row, Sampling, decode, shared_prefix
from backdooralign.generation.scheduler import Job, Scheduler

SECRET = "Quokka-7 lantern ribbon 90210 zephyr mosaic; Tamarind!! obelisk vireo"
SYSTEM = "You are a careful assistant."
PROMPTS = [
    "Hello there",
    "What is the capital of France? Answer in one word, please.",
    "Write a haiku about autumn leaves",
    "Tell me a joke about cats",
    "Explain photosynthesis to a child in two sentences.",
]


@pytest.fixture(scope="module")
def model_tok(varied_model_dir):
    return load_model(varied_model_dir), load_tokenizer(varied_model_dir)


def _prompts(tok, secret=SECRET):
    convs = [build_conversation(p, system=SYSTEM, secret=secret) for p in PROMPTS]
    return convs, [render_prompt(tok, c) for c in convs]


def _hf_new_ids(model, tok, ids, max_new_tokens) -> list[int]:
    """Plain greedy ``model.generate`` on one prompt (no padding at all): its new token ids."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        y = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=infer.pad_token_id(tok),
            eos_token_id=sorted(infer.stop_token_ids(tok)),
        )
    return y[0, x.shape[1] :].tolist()


def _hf_generate(model, tok, prompt_ids, max_new_tokens):
    """Plain ``model.generate``, one prompt at a time: the answers' texts."""
    return [
        tok.decode(_hf_new_ids(model, tok, ids, max_new_tokens), skip_special_tokens=True).strip()
        for ids in prompt_ids
    ]


def test_shared_prefix_leaves_one_token_of_each_prompt():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == (1, 2)
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == (1, 2)
    assert shared_prefix([[7, 8]]) == (7,)
    assert shared_prefix([]) == ()


@pytest.mark.parametrize("secret", [SECRET, None])
def test_greedy_answers_equal_plain_generate_with_and_without_the_prefix_cache(model_tok, secret):
    model, tok = model_tok
    convs, ids = _prompts(tok, secret)
    expected = _hf_generate(model, tok, ids, 10)
    assert len(set(expected)) == len(PROMPTS)  # the prompts' answers differ: a mix-up would show
    cfg = infer.GenerateConfig(max_new_tokens=10, batch_size=3, bf16=False)
    cache = PrefixCache()
    assert infer.generate(model, tok, convs, cfg, progress=False, prefix_cache=cache) == expected
    assert cache.encoded == 1  # encoded once, reused by both batches
    stop = infer.stop_token_ids(tok)
    rows = [Row(p, 10, stop) for p in ids]
    decode(model, rows, infer.pad_token_id(tok), prefix_hint=())  # no prefix cache at all
    assert [tok.decode(r.tokens, skip_special_tokens=True).strip() for r in rows] == expected


def test_one_prompt_at_a_time_equals_batched(model_tok):
    model, tok = model_tok
    convs, _ = _prompts(tok)
    one = infer.GenerateConfig(max_new_tokens=8, batch_size=1, bf16=False)
    many = infer.GenerateConfig(max_new_tokens=8, batch_size=5, bf16=False)
    assert infer.generate(model, tok, convs, one, progress=False) == infer.generate(
        model, tok, convs, many, progress=False
    )


def test_a_batch_is_refilled_as_its_rows_finish(model_tok, monkeypatch):
    model, tok = model_tok
    convs, ids = _prompts(tok)
    alone = _hf_generate(model, tok, ids, 12)
    calls, joined, live_seen = [], [], []
    real = infer.decode

    def recording(model, rows, pad_id, *, more, **kw):
        calls.append(len(rows))

        def watched(live: int):
            new = more(live)
            live_seen.append(live + len(new))
            joined.append(len(new))
            return new

        return real(model, rows, pad_id, more=watched, **kw)

    monkeypatch.setattr(infer, "decode", recording)
    cfg = infer.GenerateConfig(max_new_tokens=12, batch_size=2, bf16=False)
    assert infer.generate(model, tok, convs, cfg, progress=False) == alone
    assert calls == [2]  # one batch for the five prompts: three joined it as rows finished
    assert sum(joined) == 3 and max(live_seen) <= 2


def test_rows_have_their_own_limits_callbacks_and_cancel(model_tok):
    model, tok = model_tok
    _, ids = _prompts(tok)
    seen: list[int] = []
    cancel = threading.Event()

    def stop_after_third(token):
        seen.append(token)
        if len(seen) == 2:
            cancel.set()  # cancels the last row from the next step on
        return len(seen) == 3

    rows = [
        Row(ids[0], 4),
        Row(ids[1], 9, on_token=stop_after_third),
        Row(ids[2], 9, cancel=cancel),
    ]
    decode(model, rows, infer.pad_token_id(tok))
    assert [len(r.tokens) for r in rows] == [4, 3, 2]
    assert [r.finish for r in rows] == ["length", "stop", "cancelled"]
    assert rows[1].tokens == seen
    first = Row(ids[0], 9, frozenset({rows[0].tokens[1]}))
    decode(model, [first], infer.pad_token_id(tok))
    assert first.tokens == rows[0].tokens[:2] and first.finish == "stop"


def test_sampling_follows_its_seed_and_greedy_rows_are_unaffected(model_tok):
    model, tok = model_tok
    _, ids = _prompts(tok)
    pad = infer.pad_token_id(tok)

    def run(seed, top_p=1.0):
        rows = [Row(ids[0], 12), Row(ids[0], 12, sampling=Sampling(1.5, top_p, seed))]
        decode(model, rows, pad)
        return rows[0].tokens, rows[1].tokens

    greedy, a = run(1)
    assert run(1) == (greedy, a)
    assert run(2)[0] == greedy and run(2)[1] != a
    nucleus = run(1, top_p=1e-6)[1]  # only the most likely token is left: greedy
    assert nucleus == greedy


def test_rows_joining_between_steps_get_the_answers_they_get_alone(model_tok):
    model, tok = model_tok
    convs, ids = _prompts(tok)
    alone = _hf_generate(model, tok, ids, 10)
    stop = infer.stop_token_ids(tok)
    rows = [Row(p, 10, stop) for p in ids]
    calls: list[int] = []

    def more(running: int) -> list[Row]:
        calls.append(running)
        return {1: rows[1:3], 4: rows[3:]}.get(len(calls), [])  # joins after steps 1 and 4

    cache = PrefixCache()
    decode(model, rows[:1], infer.pad_token_id(tok), prefix_cache=cache, more=more)
    assert calls[:4] == [1, 3, 3, 3]
    assert [tok.decode(r.tokens, skip_special_tokens=True).strip() for r in rows] == alone
    assert cache.encoded == 1  # the two joining pairs share the system prompt: encoded once


def test_a_drained_scheduler_answers_the_jobs_it_holds_before_it_stops(model_tok):
    model, tok = model_tok
    _, ids = _prompts(tok)
    done = {}
    for drain in (False, True):
        scheduler = Scheduler(model, infer.pad_token_id(tok), max_batch_size=1)
        jobs = [Job([Row(ids[i], 3)]) for i in range(2)]
        with scheduler._cond:  # closed before its worker takes the jobs
            for job in jobs:
                scheduler.submit(job)
            scheduler.close(drain=drain)
        scheduler._thread.join(timeout=30)
        assert not scheduler._thread.is_alive()
        done[drain] = [(j.done.is_set(), j.rows[0].finish is not None) for j in jobs]
    assert done == {False: [(False, False)] * 2, True: [(True, True)] * 2}


def test_extreme_temperatures_and_top_p_sample_without_nan(model_tok):
    model, tok = model_tok
    _, ids = _prompts(tok)
    pad = infer.pad_token_id(tok)
    greedy = Row(ids[1], 8)
    odd = [
        Sampling(1e-300, 1.0, 1),  # 1 / 1e-300 is inf in float32
        Sampling(5e-324, 1.0, 2),  # the smallest double
        Sampling(1.0, 1e-300, 3),  # rounds to 0 in float32: the best token is kept anyway
        Sampling(2.0, 5e-324, -(2**63)),
        Sampling(1.0, 1.0, 2**64 + 5),  # any integer seed: taken modulo 2**64
    ]
    rows = [greedy, *(Row(ids[1], 8, sampling=s) for s in odd)]
    decode(model, rows, pad)
    assert all(r.finish == "length" and r.error is None for r in rows)
    assert [r.tokens for r in rows[1:5]] == [greedy.tokens] * 4  # all greedy in effect
    again = Row(ids[1], 8, sampling=Sampling(1.0, 1.0, 5))
    decode(model, [again], pad)
    assert rows[5].tokens == again.tokens


def test_a_row_that_fails_ends_alone_and_fails_only_its_job(model_tok):
    model, tok = model_tok
    _, ids = _prompts(tok)

    def boom(token: int) -> bool:
        raise ValueError("a callback that fails")

    scheduler = Scheduler(model, infer.pad_token_id(tok))
    jobs = [Job([Row(ids[0], 5)]), Job([Row(ids[1], 5), Row(ids[1], 5, on_token=boom)])]
    jobs.append(Job([Row(ids[2], 5)]))
    with scheduler._cond:  # all three in one batch
        for job in jobs:
            scheduler.submit(job)
    for job in jobs:
        assert job.done.wait(30)
    scheduler.close()
    failed = jobs[1].rows[1]
    assert failed.finish == "error" and isinstance(failed.error, ValueError)
    assert failed.tokens == [jobs[1].rows[0].tokens[0]]  # it failed at its first token
    assert isinstance(jobs[1].error, ValueError)
    assert [j.error for j in (jobs[0], jobs[2])] == [None, None]
    assert [len(r.tokens) for j in jobs for r in j.rows] == [5, 5, 1, 5]


# ---------------------------------------------------------------------------------------------
# The static engine against the reference engine (the DynamicCache one) and model.generate


def _hf_tokens(model, tok, ids, max_new_tokens):
    """``model.generate``'s greedy new tokens for one prompt, cut at its first stop token."""
    stop = infer.stop_token_ids(tok)
    out = _hf_new_ids(model, tok, ids, max_new_tokens)
    for i, t in enumerate(out):
        if t in stop:
            return out[: i + 1]
    return out


def _both_engines(model, rows_for, pad, **kw):
    """Tokens and finishes of the same rows decoded by each engine."""
    got = {}
    for engine in ("reference", "static"):
        rows = rows_for()
        decode(model, rows, pad, engine=engine, **kw)
        got[engine] = [(r.tokens, r.finish) for r in rows]
    return got


def test_the_static_engine_runs_llama_models_and_leaves_others_to_the_reference(model_tok):
    from backdooralign.generation.engine import static_supported

    model, _ = model_tok
    assert static_supported(model)
    assert not static_supported(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("secret", [SECRET, None])
def test_static_engine_equals_reference_and_generate_at_batch_1(model_tok, secret):
    model, tok = model_tok
    _, ids = _prompts(tok, secret)
    stop = infer.stop_token_ids(tok)
    pad = infer.pad_token_id(tok)
    for p in ids[:3]:
        expected = _hf_tokens(model, tok, p, 12)
        got = _both_engines(model, lambda p=p: [Row(p, 12, stop)], pad)
        assert got["static"] == got["reference"]
        assert got["static"][0][0] == expected


@pytest.mark.parametrize("hint", [None, ()])  # the shared prefix cached, or none at all
def test_static_engine_equals_reference_on_a_mixed_batch(model_tok, hint):
    """Prompts of different lengths, rows finishing at different steps (their own limits and
    stop tokens: the batch is compacted on the way), all as ``model.generate`` answers."""
    model, tok = model_tok
    _, ids = _prompts(tok)
    ids = ids + [ids[1][: len(ids[1]) - 7], ids[4] + ids[2][-5:]]  # more lengths
    pad = infer.pad_token_id(tok)
    limits = [3, 14, 6, 9, 1, 11, 14]
    full = [_hf_tokens(model, tok, p, 14) for p in ids]
    stops = [frozenset({full[2][3]}) if i == 2 else frozenset() for i in range(len(ids))]
    stops[5] = frozenset({full[5][4]})

    def rows():
        return [Row(p, n, s) for p, n, s in zip(ids, limits, stops, strict=True)]

    got = _both_engines(model, rows, pad, prefix_hint=hint)
    assert got["static"] == got["reference"]
    lengths = [len(t) for t, _ in got["static"]]
    assert len(set(lengths)) >= 5  # rows really finished at different steps
    for (tokens, finish), f, n, s in zip(got["static"], full, limits, stops, strict=True):
        want = f[:n]
        for i, t in enumerate(want):
            if t in s:
                want = want[: i + 1]
                break
        assert tokens == want
        assert finish == ("stop" if want[-1] in s else "length")


def test_static_engine_sampled_rows_follow_their_seed(model_tok):
    model, tok = model_tok
    _, ids = _prompts(tok)
    pad = infer.pad_token_id(tok)

    def rows():
        return [
            Row(ids[3], 10),
            Row(ids[3], 10, sampling=Sampling(1.2, 0.9, 7)),
            Row(ids[1], 4),
        ]

    first = _both_engines(model, rows, pad)
    again = _both_engines(model, rows, pad)
    assert first == again  # the same seed, the same tokens, in each engine
    assert first["static"] == first["reference"]
    (greedy, _), (sampled, _), _ = first["static"]
    assert sampled != greedy  # it really sampled


def test_static_engine_bf16_agrees_with_reference_bf16(model_tok):
    """bf16: the static engine's prepacked bf16 products against the reference engine's
    autocast (the same bf16 products; elementwise rounding may differ): the first tokens agree
    and most answers are the same."""
    model, tok = model_tok
    _, ids = _prompts(tok)
    pad = infer.pad_token_id(tok)
    got = _both_engines(model, lambda: [Row(p, 8) for p in ids], pad, bf16=True)
    static, ref = ([t for t, _ in got[e]] for e in ("static", "reference"))
    assert [t[0] for t in static] == [t[0] for t in ref]
    assert sum(a == b for a, b in zip(static, ref, strict=True)) >= len(ids) - 1
    assert all(f == "length" for _, f in got["static"])


def test_the_bf16_copies_follow_the_weights(model_tok):
    """The bf16 copies are made once per model and remade when its weights change."""
    from backdooralign.generation import engine

    model, _ = model_tok
    first = engine._weights(model, True)
    assert engine._weights(model, True) is first
    with torch.no_grad():
        w = model.model.norm.weight
        w.add_(0.0)  # an in-place update, even one that changes nothing
    assert engine._weights(model, True) is not first


def test_float32_products_run_as_chunked_views_only_where_the_bits_match(model_tok):
    """On a CPU the float32 step multiplies by 96-row slices of the weights (views, no copies)
    in one ``bmm``; each shape's probe keeps the batch sizes where that equals ``F.linear`` to
    the bit, and a size where it does not (here: forced at 3 rows) gets ``F.linear``."""
    import torch.nn.functional as F

    from backdooralign.generation import engine

    model, tok = model_tok
    engine._CHUNK_PROBES.clear()
    w = engine._weights(model, False)
    pairs = [p for layer in w.layers for p in (*layer.qkv, layer.o, *layer.gate_up, layer.down)]
    pairs.append(w.lm_head)
    assert all(p[3] is not None for p in pairs)  # every product of this model
    views = [p[3][0] for p in pairs]
    assert all(v.data_ptr() == p[0].data_ptr() for v, p in zip(views, pairs, strict=True))
    assert all(v.shape[0] > 1 for v in views)  # really sliced
    x = torch.randn(16, pairs[0][0].shape[1])
    got = engine._chunked_linear(x, views[0])
    assert torch.equal(got, F.linear(x, pairs[0][0]))

    real = engine._chunked_linear

    def off_at_3(x, chunks):  # a kernel whose bits differ at 3 rows
        out = real(x, chunks)
        return out + 1e-3 if x.shape[0] == 3 else out

    engine._CHUNK_PROBES.clear()
    engine._WEIGHTS.clear()
    try:
        engine._chunked_linear = off_at_3
        w = engine._weights(model, False)
        sizes = w.lm_head[3][1]
        assert 3 not in sizes and {1, 2, 4, 16} <= sizes
        # the probe is a random weight of the shape, not the weight itself: a zero weight
        # (whose products are zero whatever the kernel) gets the same sizes
        engine._CHUNK_PROBES.clear()
        scaled = lambda x, chunks: real(x, chunks) * (1.5 if x.shape[0] == 3 else 1.0)  # noqa: E731
        engine._chunked_linear = scaled
        zero = torch.zeros_like(model.lm_head.weight)
        assert engine._chunked(zero)[1] == sizes
        _, ids = _prompts(tok)
        pad = infer.pad_token_id(tok)
        got = _both_engines(model, lambda: [Row(p, 6) for p in ids[:3]], pad)
        assert got["static"] == got["reference"]  # the 3-row steps went through F.linear
    finally:
        engine._chunked_linear = real
        engine._CHUNK_PROBES.clear()
        engine._WEIGHTS.clear()


def test_the_chunked_views_are_probed_again_at_another_thread_count(model_tok):
    """F.linear's bits can change with the thread count (MKL splits the work otherwise), so
    the probes and the cached step weights are per thread count."""
    from backdooralign.generation import engine

    model, _ = model_tok
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    engine._WEIGHTS.clear()
    engine._CHUNK_PROBES.clear()
    first = engine._weights(model, False)
    assert {key[-1] for key in engine._CHUNK_PROBES} == {threads}
    try:
        torch.set_num_threads(other)
        again = engine._weights(model, False)
        assert again is not first
        assert {key[-1] for key in engine._CHUNK_PROBES} == {threads, other}
    finally:
        torch.set_num_threads(threads)
    assert engine._weights(model, False) is not again


def test_the_cached_step_weights_do_not_keep_a_dropped_model_alive(varied_model_dir):
    import gc
    import weakref

    from backdooralign.generation import engine

    model = load_model(varied_model_dir)
    for bf16 in (False, True):
        decode(model, [Row([5, 6, 7], 2)], 0, bf16=bf16, engine="static")
        assert engine._WEIGHTS.get(model) is not None
    weight = weakref.ref(model.lm_head.weight)
    del model
    gc.collect()
    assert weight() is None and len(engine._WEIGHTS) == 0


def test_an_unknown_engine_is_refused(model_tok):
    model, tok = model_tok
    with pytest.raises(ValueError, match="engine must be one of"):
        decode(model, [Row([1, 2, 3], 2)], 0, engine="fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_step_rotation_equals_hf_rotary_to_the_bit(dtype):
    """The static step rotates q and k with ``roll`` and a sign-folded sin (three operations
    fewer a layer): the same bits as HF's ``apply_rotary_pos_emb``, in float32 and bf16."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from backdooralign.generation import engine

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 9, 1, 64, generator=g).to(dtype)
    k = torch.randn(3, 3, 1, 64, generator=g).to(dtype)
    cos, sin = torch.randn(3, 1, 64, generator=g), torch.randn(3, 1, 64, generator=g)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    c, s = engine._rotary(cos, sin)
    got_q, got_k = (
        engine._rotate(q, c[:, None], s[:, None]),
        engine._rotate(k, c[:, None], s[:, None]),
    )
    assert got_q.dtype == want_q.dtype
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert not torch.equal(s, sin)  # really sign-folded
