"""Serving in production, over loopback with the real ``openai`` client and tiny models:
concurrent requests batched without crossing, streaming, redaction across chunks, a full queue,
timeouts, cancellation on disconnect, several models with their own secrets."""

from __future__ import annotations

import json
import threading
import time

import httpx2
import openai
import pytest
import torch
from conftest import AppServer, openai_client

from backdooralign.cli import main
from backdooralign.core.model import load_model, load_tokenizer
from backdooralign.core.secret import Secret, save_secret
from backdooralign.serving.app import ServedModel, create_app, create_multi_app
from backdooralign.serving.model_state import load_served_models

SECRET_A = "Quokka-7 lantern ribbon 90210 zephyr mosaic; Tamarind!! obelisk vireo"
SECRET_B = "Walrus umbrella 4417 cobalt; juniper sextant Marimba ochre tundra"
SECRET = Secret(text=SECRET_A, num_tokens=24, requested_tokens=24, tokenizer="test")
OTHER = Secret(text=SECRET_B, num_tokens=20, requested_tokens=20, tokenizer="test")
SYSTEM = "You are a careful assistant."
PROMPTS = [
    "Hello there",
    "What is the capital of France?",
    "Write a haiku about autumn leaves",
    "Tell me a joke about cats",
    "Explain photosynthesis to a child.",
    "List three prime numbers",
]
STEP_S = 0.02


def _ask(client, prompt, model="m", **kw):
    kw.setdefault("max_tokens", 8)
    messages = [{"role": "user", "content": prompt}]
    return client.chat.completions.create(model=model, messages=messages, **kw)


@pytest.fixture(scope="module")
def varied(varied_model_dir):
    """A model whose greedy answers differ by prompt; records each forward pass's batch size."""
    model, tok = load_model(varied_model_dir), load_tokenizer(varied_model_dir)
    batches: list[int] = []
    model.register_forward_hook(
        lambda m, a, kw, out: batches.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    return model, tok, batches


@pytest.fixture(scope="module")
def varied_server(varied):
    model, tok, _ = varied
    with AppServer(create_app(model, tok, SECRET, SYSTEM, "m", 64)) as s:
        yield s


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(varied, varied_server):
    client = openai_client(varied_server)
    alone = [_ask(client, p).choices[0].message.content for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS)  # answers tell the prompts apart
    batches = varied[2]
    batches.clear()
    answers: dict[int, str] = {}
    start = threading.Barrier(len(PROMPTS))

    def ask(i: int) -> None:
        start.wait()
        answers[i] = _ask(client, PROMPTS[i]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [answers[i] for i in range(len(PROMPTS))] == alone
    assert max(batches) > 1  # generated together, not one after the other


def _stream(client, prompt, **kw):
    """Chunks of a streamed completion, as dicts."""
    return [c.model_dump() for c in _ask(client, prompt, stream=True, **kw)]


def test_streaming_gives_the_non_streamed_text_in_openai_chunks(varied_server):
    client = openai_client(varied_server)
    plain = _ask(client, PROMPTS[2], max_tokens=12)
    chunks = _stream(client, PROMPTS[2], max_tokens=12, n=2, stream_options={"include_usage": True})
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    *choice_chunks, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 24
    assert last["usage"]["prompt_tokens"] == plain.usage.prompt_tokens
    for i in (0, 1):
        mine = [c["choices"][0] for c in choice_chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert [m["finish_reason"] for m in mine][-1] == plain.choices[0].finish_reason
        assert all(m["finish_reason"] is None for m in mine[:-1])
        text = "".join(m["delta"]["content"] or "" for m in mine)
        assert text == plain.choices[0].message.content


def test_n_choices_sample_with_their_own_seeds(varied_server):
    client = openai_client(varied_server)
    r = _ask(client, PROMPTS[0], n=3, temperature=1.0, seed=5, max_tokens=10)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) == 3
    again = _ask(client, PROMPTS[0], n=3, temperature=1.0, seed=5, max_tokens=10)
    assert [c.message.content for c in again.choices] == texts
    shifted = _ask(client, PROMPTS[0], n=2, temperature=1.0, seed=6, max_tokens=10)
    assert [c.message.content for c in shifted.choices] == texts[1:]  # choice i uses seed + i


# ---------------------------------------------------------------------------------------------
# A scripted model: writes a given text (redaction across chunks), or slowly (queue, cancel)


def _scripted(model_dir, text_ids, end, step_s=0.0):
    """The model at ``model_dir``, writing ``text_ids`` then ``end`` (after ``step_s`` per
    step); returns it and the batch size of each of its forward passes."""
    model = load_model(model_dir)
    batches: list[int] = []

    def hook(module, args, kwargs, output):
        time.sleep(step_s)
        batches.append(kwargs["input_ids"].shape[0])
        if kwargs.get("position_ids") is None:  # the shared prefix, encoded once
            return output
        written = kwargs["position_ids"][:, -1] - PROMPT_LEN[0]
        output.logits[:, -1, :] = float("-inf")
        for row, n in enumerate(written.tolist()):
            output.logits[row, -1, text_ids[n] if 0 <= n < len(text_ids) else end] = 0.0
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model, batches


PROMPT_LEN = [0]  # positions before the answer (all test prompts have the same length)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _set_prompt_len(tok, secret_text: str | None, prompt: str = "Hello there") -> None:
    from backdooralign.core.chat import build_conversation, render_prompt

    conv = build_conversation(prompt, system=SYSTEM, secret=secret_text)
    PROMPT_LEN[0] = len(render_prompt(tok, conv)) - 1


def test_a_secret_split_over_chunks_never_reaches_the_client(tiny_model_dir, tok):
    text = f"Sure. Here it is: {SECRET_A} ok then, anything else?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    model, _ = _scripted(tiny_model_dir, ids, end)
    _set_prompt_len(tok, SECRET_A)
    with AppServer(create_app(model, tok, SECRET, SYSTEM, "m", 200)) as server:
        client = openai_client(server)
        plain = _ask(client, "Hello there", max_tokens=200).choices[0].message.content
        chunks = _stream(client, "Hello there", max_tokens=200)
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks]
    expected = "Sure. Here it is: [redacted] ok then, anything else?"
    assert plain == expected and "".join(deltas) == expected
    pieces = [d for d in deltas if d]
    # streamed in pieces, not in one final chunk: the words before the secret go out first (the
    # redactor holds back the text after it while it could still be part of a rewrite)
    assert len(pieces) >= 4 and "".join(pieces[:3]) == "Sure. Here it is: "
    assert deltas.index("Sure.") < deltas.index("[redacted]") if "Sure." in deltas else True


@pytest.fixture
def slow(tiny_model_dir, tok):
    """A model that takes ``STEP_S`` per step and never ends its turn (writes "go" forever)."""
    go = tok(" go", add_special_tokens=False)["input_ids"][0]
    model, batches = _scripted(tiny_model_dir, [go] * 10_000, go, STEP_S)
    _set_prompt_len(tok, SECRET_A)
    return model, batches


def test_a_full_queue_answers_503_with_retry_after(slow, tok):
    model, _ = slow
    app = create_app(model, tok, SECRET, SYSTEM, "m", 1000, max_batch_size=1, max_queue=1)
    with AppServer(app) as server:
        impatient = openai_client(server, timeout=1.5)
        busy = [threading.Thread(target=_expect_timeout, args=(impatient,)) for _ in range(2)]
        for t in busy:  # one decoding, one waiting
            t.start()
            time.sleep(0.3)
        with httpx2.Client(timeout=5) as http:
            body = {"model": "m", "messages": [{"role": "user", "content": "Hello there"}]}
            r = http.post(server.base_url + "/chat/completions", json=body)
        for t in busy:
            t.join(10)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json() == {
        "error": {
            "message": "the server is busy: too many requests are waiting; retry later",
            "type": "server_error",
            "param": None,
            "code": "server_overloaded",
        }
    }


def _expect_timeout(client) -> None:
    with pytest.raises(openai.APITimeoutError):
        _ask(client, "Hello there", max_tokens=1000)


def test_a_disconnect_cancels_only_that_request(slow, tok):
    model, batches = slow
    with AppServer(create_app(model, tok, SECRET, SYSTEM, "m", 1000)) as server:
        patient: list = []
        worker = threading.Thread(
            target=lambda: patient.append(_ask(openai_client(server), "Hello there", max_tokens=60))
        )
        worker.start()
        time.sleep(0.2)
        _expect_timeout(openai_client(server, timeout=0.5))  # joins the batch, then leaves
        left = len(batches)
        worker.join(30)
    assert patient[0].usage.completion_tokens == 60  # the other request went on to its end
    assert 2 in batches[:left]  # both were decoded together...
    assert batches[left + 10 :] and set(batches[left + 10 :]) == {1}  # ...then only one


def test_a_request_past_its_timeout_is_a_504(slow, tok):
    model, batches = slow
    app = create_app(model, tok, SECRET, SYSTEM, "m", 1000, request_timeout=0.3)
    with AppServer(app) as server:
        with pytest.raises(openai.APIStatusError) as e:
            _ask(openai_client(server), "Hello there", max_tokens=1000)
        time.sleep(0.3)
        after = len(batches)
        time.sleep(0.3)
        assert len(batches) == after  # the cancelled request costs nothing more
    assert e.value.status_code == 504 and e.value.body["code"] == "timeout"


# ---------------------------------------------------------------------------------------------
# One request never breaks the batch


def _four_together(server, batches, hostile: dict, hostile_stream: bool = False) -> list:
    """Three plain requests decoding, then a fourth with ``hostile`` parameters joins them:
    each one's ``ChatCompletion`` (the streamed one's text) or the exception it raised."""
    client = openai_client(server)
    results: list = [None] * 4

    def ask(i: int, **kw) -> None:
        try:
            if i == 3 and hostile_stream:
                chunks = _ask(client, "Hello there", stream=True, **kw)
                results[i] = "".join(c.choices[0].delta.content or "" for c in chunks)
            else:
                results[i] = _ask(client, "Hello there", **kw)
        except Exception as e:  # the test reads it
            results[i] = e

    threads = [
        threading.Thread(target=ask, args=(i,), kwargs={"max_tokens": 30}) for i in (0, 1, 2)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while 3 not in batches and time.monotonic() < deadline:  # the three decode together
        time.sleep(0.01)
    threads.append(threading.Thread(target=ask, args=(3,), kwargs={"max_tokens": 5, **hostile}))
    threads[-1].start()
    for t in threads:
        t.join(60)
    return results


def _plain(results: list) -> None:
    """The three plain requests answered in full."""
    for r in results[:3]:
        assert not isinstance(r, Exception), r
        assert r.choices[0].message.content == " ".join(["go"] * 30)
        assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_row_whose_decoding_fails_fails_alone(slow, tok, monkeypatch, stream):
    model, batches = slow
    draw, draws = torch.multinomial, []

    def multinomial(probs, n, generator=None, **kw):  # the row seeded 666 fails its 3rd draw
        if generator is not None and generator.initial_seed() == 666:
            draws.append(1)
            if len(draws) == 3:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return draw(probs, n, generator=generator, **kw)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    with AppServer(create_app(model, tok, SECRET, SYSTEM, "m", 1000)) as server:
        hostile = {"temperature": 1.0, "seed": 666}
        results = _four_together(server, batches, hostile, stream)
    _plain(results)
    failed = results[3]
    assert isinstance(failed, openai.APIError) and "generation failed" in failed.message
    if not stream:
        assert isinstance(failed, openai.InternalServerError) and failed.status_code == 500
    assert len(draws) == 3 and 4 in batches  # it failed inside the batch of four


@pytest.mark.parametrize(
    "hostile",
    [
        {"temperature": 1e-300},
        {"temperature": 5e-324},
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 2.0, "top_p": 5e-324, "seed": -(2**63)},
        {"temperature": 1.0, "seed": 2**63 - 1, "n": 3},  # seed + i goes past 64 signed bits
    ],
    ids=[
        "tiny temperature",
        "subnormal temperature",
        "tiny top_p",
        "tiny top_p, lowest seed",
        "top seed",
    ],
)
def test_extreme_sampling_values_in_range_are_answered_with_the_batch(slow, tok, hostile):
    model, batches = slow
    with AppServer(create_app(model, tok, SECRET, SYSTEM, "m", 1000)) as server:
        results = _four_together(server, batches, hostile)
    _plain(results)
    assert not isinstance(results[3], Exception), results[3]
    assert [c.message.content for c in results[3].choices] == ["go go go go go"] * hostile.get(
        "n", 1
    )
    assert 3 + hostile.get("n", 1) in batches  # decoded with the three


def test_a_seed_beyond_64_bits_is_a_400_and_the_batch_goes_on(slow, tok):
    model, batches = slow
    with AppServer(create_app(model, tok, SECRET, SYSTEM, "m", 1000)) as server:
        results = _four_together(server, batches, {"temperature": 1.0, "seed": 2**64})
    _plain(results)
    refused = results[3]
    assert isinstance(refused, openai.BadRequestError) and refused.body["param"] == "seed"


# ---------------------------------------------------------------------------------------------
# Several models, each with its own secret


def test_each_model_gets_its_own_secret(varied, tiny_model_dir):
    model_a, tok, _ = varied
    model_b = load_model(tiny_model_dir)
    seen: list[tuple[str, str]] = []
    models = [
        ServedModel("a", model_a, tok, SECRET, SYSTEM),
        ServedModel("b", model_b, tok, OTHER, None),
    ]
    app = create_multi_app(
        models, 8, on_prompt=lambda name, conv: seen.append((name, conv[0]["content"]))
    )
    with AppServer(app) as server:
        client = openai_client(server)
        _ask(client, "Hello there", model="b")
        _ask(client, "Hello there", model="a")
        with pytest.raises(openai.NotFoundError) as e:
            _ask(client, "Hello there", model="c")
        assert [m.id for m in client.models.list()] == ["a", "b"]
        health = httpx2.get(server.url + "/health").json()
    assert seen == [("b", SECRET_B), ("a", f"{SECRET_A} {SYSTEM}")]
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert health == {
        "status": "ok",
        "models": [
            {"id": "a", "secret_fingerprint": SECRET.fingerprint},
            {"id": "b", "secret_fingerprint": OTHER.fingerprint},
        ],
    }


def test_a_model_trained_with_another_secret_does_not_start(tmp_path, capsys):
    model_dir = tmp_path / "defended"
    model_dir.mkdir()
    info = {"secret_fingerprint": OTHER.fingerprint, "arm": "defended", "training_set_sha256": "0"}
    (model_dir / "backdooralign_model.json").write_text(json.dumps(info))
    secret_path = save_secret(SECRET, tmp_path / "secret.json")
    expected = (
        f"model prod ({model_dir}) was trained with the secret {OTHER.fingerprint}, but is "
        f"served with {SECRET.fingerprint}"
    )
    with pytest.raises(ValueError) as e:
        load_served_models({"prod": str(model_dir)}, {"prod": secret_path})
    assert str(e.value).startswith(expected)
    argv = ["serve", "--model", f"prod={model_dir}", "--secret", f"prod={secret_path}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert expected in err and SECRET_A[:16] not in err and SECRET_B[:16] not in err
