"""Hostile and careless HTTP requests to ``serve`` and to the fine-tuning ``service``, over
loopback: each row is a request and the OpenAI error object it must get (status, ``param`` or
``code``, words of the message). No row may be a 500, a bodiless redirect or FastAPI's
``{"detail": ...}``; the service lists in ``/v1/models`` only models its chat answers for."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx2
import openai
import pytest
from conftest import AppServer, make_tiny_model, openai_client
from test_service import _served_job

from backdooralign.service.app import create_service
from backdooralign.service.config import load_service_config
from backdooralign.serving.app import create_app

BIG = "9" * 5000  # more digits than Python reads into an int
HELLO = [{"role": "user", "content": "hi"}]


def _chat(**extra) -> bytes:
    return json.dumps({"model": "m", "messages": HELLO, "max_tokens": 2, **extra}).encode()


def _with(raw: str) -> bytes:
    """A chat body whose last field is ``raw`` JSON text (what ``json.dumps`` cannot write)."""
    return _chat()[:-1] + b", " + raw.encode() + b"}"


@dataclass(frozen=True)
class Req:
    name: str
    target: str  # "serve" or "service"
    method: str
    path: str  # under the root
    body: bytes | None
    status: int
    param: str | None = None
    code: str | None = None
    words: tuple[str, ...] = ()


JOB = {"model": "tiny", "training_file": "file-x"}
CASES = [
    # --- numbers out of range: a 400 naming the parameter, never a 500 for the batch
    Req("seed past 64 bits", "serve", "POST", "/v1/chat/completions", _chat(seed=2**64), 400,
        "seed", words=("seed", "9223372036854775807")),
    Req("seed 2**63", "serve", "POST", "/v1/chat/completions", _chat(seed=2**63), 400, "seed"),
    Req("seed below -2**63", "serve", "POST", "/v1/chat/completions", _chat(seed=-(2**63) - 1),
        400, "seed"),
    Req("temperature above 2", "serve", "POST", "/v1/chat/completions",
        _chat(temperature=2.000001), 400, "temperature"),
    Req("temperature below 0", "serve", "POST", "/v1/chat/completions", _chat(temperature=-1e-9),
        400, "temperature"),
    Req("top_p 0", "serve", "POST", "/v1/chat/completions", _chat(top_p=0), 400, "top_p"),
    Req("top_p above 1", "serve", "POST", "/v1/chat/completions", _chat(top_p=1.0000001), 400,
        "top_p"),
    Req("max_tokens past 32 bits", "serve", "POST", "/v1/chat/completions",
        _chat(max_tokens=2**31), 400, "max_tokens", words=("2147483647",)),
    Req("max_completion_tokens huge", "serve", "POST", "/v1/chat/completions",
        _chat(max_completion_tokens=10**300), 400, "max_completion_tokens"),
    Req("n huge", "serve", "POST", "/v1/chat/completions", _chat(n=10**30), 400, "n"),
    Req("a 5000-digit max_tokens", "serve", "POST", "/v1/chat/completions",
        _with(f'"max_tokens": {BIG}'), 400, words=("integer", "4300 digits")),
    Req("a 5000-digit integer deep inside", "serve", "POST", "/v1/chat/completions",
        _with(f'"user": "u", "stop": [[{BIG}]]'), 400, words=("4300 digits",)),
    Req("NaN temperature", "serve", "POST", "/v1/chat/completions", _with('"temperature": NaN'),
        400, words=("NaN", "not a JSON number")),
    Req("Infinity top_p", "serve", "POST", "/v1/chat/completions", _with('"top_p": Infinity'),
        400, words=("Infinity",)),
    Req("1e400 temperature", "serve", "POST", "/v1/chat/completions",
        _with('"temperature": 1e400'), 400, words=("too large",)),
    Req("a 5000-digit seed in a job", "service", "POST", "/v1/fine_tuning/jobs",
        json.dumps(JOB).encode()[:-1] + f', "seed": {BIG}}}'.encode(), 400,
        words=("4300 digits",)),
    Req("a 5000-digit chat body", "service", "POST", "/v1/chat/completions",
        _with(f'"seed": {BIG}'), 400, words=("4300 digits",)),
    Req("NaN epochs in a job", "service", "POST", "/v1/fine_tuning/jobs",
        json.dumps(JOB).encode()[:-1] + b', "hyperparameters": {"n_epochs": NaN}}', 400,
        words=("NaN",)),
    Req("a 5000-digit limit", "service", "GET", f"/v1/fine_tuning/jobs?limit={BIG}", None, 400,
        "limit"),
    Req("a superscript limit", "service", "GET", "/v1/files?limit=%C2%B2", None, 400, "limit"),
    # --- routes: unknown, slashes, methods, documentation
    Req("unknown route", "serve", "GET", "/v1/nope", None, 404, code="not_found",
        words=("GET /v1/nope",)),
    Req("unknown route", "service", "GET", "/v1/nope", None, 404, code="not_found"),
    Req("a 6000-character route", "serve", "GET", "/v1/" + "x" * 6000, None, 404,
        code="not_found", words=("unknown route",)),
    Req("a slash too many", "serve", "POST", "/v1/chat/completions/", _chat(), 404,
        code="not_found"),
    Req("a slash too many", "service", "GET", "/v1/files/", None, 404, code="not_found"),
    Req("a slash too many on an id", "service", "GET", "/v1/files/file-x/", None, 404,
        code="not_found"),
    Req("GET on chat", "serve", "GET", "/v1/chat/completions", None, 405,
        code="method_not_allowed", words=("GET", "/v1/chat/completions")),
    Req("DELETE on models", "serve", "DELETE", "/v1/models", None, 405,
        code="method_not_allowed"),
    Req("PUT on files", "service", "PUT", "/v1/files", None, 405, code="method_not_allowed"),
    Req("GET on cancel", "service", "GET", "/v1/fine_tuning/jobs/x/cancel", None, 405,
        code="method_not_allowed"),
    Req("openapi document", "serve", "GET", "/openapi.json", None, 404, code="not_found"),
    Req("openapi document", "service", "GET", "/openapi.json", None, 404, code="not_found"),
    Req("docs", "service", "GET", "/docs", None, 404, code="not_found"),
    # --- the service's base model is not a chat model
    Req("chat with the base model", "service", "POST", "/v1/chat/completions",
        json.dumps({"model": "tiny", "messages": HELLO}).encode(), 404, "model",
        "model_not_found", ("base model", "fine-tuned models only")),
    Req("retrieve the base model", "service", "GET", "/v1/models/tiny", None, 404, "model",
        "model_not_found"),
]  # fmt: skip


@pytest.fixture(scope="module")
def servers(tokenizer, tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("hostile-http")
    config = tmp / "service.yaml"
    config.write_text(f"base_model: {tiny_model_dir}\nbase_model_name: tiny\nmax_new_tokens: 2\n")
    service = create_service(tmp / "svc", load_service_config(config))
    serve = create_app(make_tiny_model(tokenizer), tokenizer, None, None, "m", 4)
    with AppServer(serve, "warning") as a, AppServer(service, "warning") as b:
        yield {"serve": a, "service": b}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.target}: {c.name}" for c in CASES])
def test_hostile_request(case: Req, servers):
    server = servers[case.target]
    headers = {"Authorization": "Bearer sk-any", "Content-Type": "application/json"}
    with httpx2.Client(timeout=60, follow_redirects=False) as http:
        r = http.request(case.method, server.url + case.path, content=case.body, headers=headers)
    assert r.status_code == case.status, r.text[:300]
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (case.param, case.code)
    assert all(w in error["message"] for w in case.words), error["message"]
    assert len(error["message"]) < 300  # a huge value is not echoed back
    if case.status == 405:
        assert r.headers["allow"]


def test_every_case_has_its_own_name():
    names = [f"{c.target}: {c.name}" for c in CASES]
    assert len(names) == len(set(names))


def test_the_service_lists_only_models_its_chat_answers_for(tmp_path, tiny_model_dir):
    config = tmp_path / "service.yaml"
    config.write_text(f"base_model: {tiny_model_dir}\nbase_model_name: tiny\nmax_new_tokens: 2\n")
    cfg = load_service_config(config)
    with AppServer(create_service(tmp_path / "empty", cfg), "warning") as server:
        assert openai_client(server).models.list().data == []  # no fine-tuned model yet
    data_dir = tmp_path / "svc"
    app = create_service(data_dir, cfg)
    name = _served_job(app, data_dir, cfg, tiny_model_dir, "mine")
    with AppServer(app, "warning") as server:
        client = openai_client(server)
        listed = [m.id for m in client.models.list().data]
        assert listed == [name]
        for model in listed:  # each answers
            r = client.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
            assert r.model == model and r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        assert e.value.body["code"] == "model_not_found"
