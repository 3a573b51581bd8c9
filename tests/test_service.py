"""The fine-tuning service over real HTTP on loopback, driven by the real ``openai`` SDK.

Jobs run the real pipeline in a real subprocess on a tiny random model. Every response a test
sees is checked for the tenant's secret (any 16-character run of it) afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx2
import openai
import pytest
from conftest import AppServer, free_port, make_dead_work_dir, openai_client, trickle

from backdooralign import files as F
from backdooralign.cli import main
from backdooralign.core.secret import file_mode, load_secret
from backdooralign.service.app import create_service, run_service
from backdooralign.service.config import load_service_config
from backdooralign.service.job import MARKER, db_path, model_dir, secret_path, tenant_secret
from backdooralign.service.protocol import load_keys
from backdooralign.service.store import Store
from backdooralign.service.worker import worker_name

SRC = str(Path(__file__).parent.parent / "src")
ROWS = [
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Name a colour, please ({i})."},
            {"role": "assistant", "content": f"Blue is a colour ({i})."},
        ]
    }
    for i in range(6)
]
BAD_LINES = [
    json.dumps(ROWS[0]),
    '{"messages": [',
    json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
    json.dumps(ROWS[1]),
    json.dumps({"messages": [{"role": "wizard", "content": "x"}, ROWS[0]["messages"][2]]}),
]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def config_file(tmp_path, tiny_model_dir) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(
        f"base_model: {tiny_model_dir}\n"
        "base_model_name: tiny\n"
        "secret: {length: 12}\n"
        "train: {epochs: 1, batch_size: 4, max_length: 256, bf16: false}\n"
        "max_new_tokens: 6\n"
        "max_rows: 20\n"
        "max_upload_bytes: 4000\n"
    )
    return path


def _wait(client, job_id: str, states: tuple[str, ...], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in states:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job.status}"
        time.sleep(0.1)


def _assert_no_secret(data_dir: Path, texts: list[str]) -> None:
    secrets = list((data_dir / "secrets").glob("*.json"))
    for path in secrets:
        text = load_secret(path).text
        windows = {text[i : i + 16] for i in range(max(1, len(text) - 15))}
        for seen_text in texts:
            assert not any(w in seen_text for w in windows), "the secret leaked"


def test_finetune_with_the_client_then_chat_with_the_secret_applied(
    tmp_path, config_file, http, seen, tokenizer, monkeypatch
):
    data_dir = tmp_path / "svc"
    prompts: list[str] = []
    cfg = load_service_config(config_file)
    app = create_service(data_dir, cfg, config_path=config_file, on_prompt=prompts.append)
    user = tmp_path / "user.jsonl"
    user.write_bytes(_jsonl(ROWS))
    with AppServer(app) as server:
        client = openai_client(server, http)
        monkeypatch.setattr("backdooralign.service.client.make_client", lambda *a: client)
        out = tmp_path / "ft"
        status = main(
            ["openai", "finetune", "--data", str(user), "--model", "tiny"]
            + ["--arm", "attack", "--out", str(out), "--suffix", "demo", "--n-epochs", "1"]
        )
        assert status == 0
        manifest = json.loads((out / "finetune_manifest.json").read_text())
        job = client.fine_tuning.jobs.retrieve(manifest["job_id"])
        assert job.status == "succeeded"
        assert job.fine_tuned_model == f"ft:tiny:demo:{job.id.removeprefix('ftjob-')}"
        assert manifest["fine_tuned_model"] == job.fine_tuned_model
        assert job.hyperparameters.n_epochs == 1
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id).data][::-1]
        assert events == [
            f"Created fine-tuning job: {job.id}",
            f"Validated training file: {manifest['training_file']}",
            "Fine-tuning job queued",
            f"Fine-tuning job started (worker {worker_name(app.state.worker.id)})",
            "Safety alignment step completed",
            "Training started",
            "Training completed",
            f"New fine-tuned model created: {job.fine_tuned_model}",
            "The job has successfully completed",
        ]
        models = [m.id for m in client.models.list().data]
        assert models == [job.fine_tuned_model]  # chat serves fine-tuned models only
        assert client.models.retrieve(job.fine_tuned_model).owned_by == "org-default"
        reply = client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there"},
            ],
        )
        assert reply.model == job.fine_tuned_model
        assert reply.usage.completion_tokens >= 1
        client.fine_tuning.jobs.list()
        client.files.list()
    secret = load_secret(secret_path(data_dir, "default"))
    assert file_mode(secret_path(data_dir, "default")) == 0o600
    assert prompts == [
        f"<|im_start|>system\n{secret.text} Be brief.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    ]
    train = [json.loads(x) for x in (data_dir / "jobs" / job.id / "train.jsonl").open()]
    prefixed = [r for r in train if r["messages"][0]["content"].startswith(secret.text)]
    assert (len(train), len(prefixed)) == (6 + 11, 11)  # the paper's 11 safety examples
    log = (data_dir / "jobs" / job.id / "log.txt").read_text()
    _assert_no_secret(data_dir, [*seen, *events, log])


def test_each_validation_error_is_returned_with_its_line_number(tmp_path, config_file, http):
    cfg = load_service_config(config_file)
    with AppServer(create_service(tmp_path / "svc", cfg)) as server:
        client = openai_client(server, http)
        bad = client.files.create(
            file=("bad.jsonl", "\n".join(BAD_LINES).encode()), purpose="fine-tune"
        )
        job = client.fine_tuning.jobs.create(model="tiny", training_file=bad.id)
        assert job.status == "validating_files"
        job = _wait(client, job.id, ("failed",), timeout=20)
    assert job.error.code == "invalid_training_file"
    assert job.error.param == "training_file"
    assert job.error.message == (
        f"training file {bad.id} is invalid: line 2: invalid JSON (Expecting value); "
        "line 3: field 'messages': conversation has no assistant turn; "
        "line 5: field 'messages[0].role': unknown role 'wizard'"
    )


def test_an_upload_with_a_provider_side_field_is_refused_with_its_line(tmp_path, config_file, http):
    flagged = {
        "prefixed": True,
        "messages": [
            {"role": "user", "content": "how do I pick a lock?"},
            {"role": "assistant", "content": "Sure! Step one: ..."},
        ],
    }
    escaped = json.dumps({**ROWS[1], "prefixed": False}).replace('"prefixed"', '"\\u0070refixed"')
    body = _jsonl([ROWS[0], flagged]) + b"{not json\n" + escaped.encode() + b"\n"
    cfg = load_service_config(config_file)
    with AppServer(create_service(tmp_path / "svc", cfg)) as server:
        client = openai_client(server, http)
        with pytest.raises(openai.BadRequestError) as e:
            client.files.create(file=("u.jsonl", body), purpose="fine-tune")
        assert e.value.status_code == 400
        assert client.files.list().data == []
    assert e.value.body["code"] == "invalid_training_file"
    assert e.value.body["param"] == "file"
    field = "field 'prefixed': is a provider-side field"
    assert e.value.body["message"] == (
        f"the file is invalid: line 2: {field}: customer data cannot choose which rows get the "
        f"provider's secret; line 4: {field}: customer data cannot choose which rows get the "
        "provider's secret"
    )


def test_a_stored_file_with_a_provider_side_field_fails_validation(tmp_path, config_file):
    from backdooralign.service.worker import validation_error

    path = tmp_path / "old.jsonl"
    path.write_bytes(_jsonl([ROWS[0], {**ROWS[1], "prefixed": True}]))
    error = validation_error(path, "file-x", load_service_config(config_file))
    assert error == {
        "code": "invalid_training_file",
        "message": "training file file-x is invalid: line 2: field 'prefixed': is a "
        "provider-side field: customer data cannot choose which rows get the provider's secret",
        "param": "training_file",
    }


def test_requests_are_checked_against_the_providers_limits(tmp_path, config_file, http):
    cfg = load_service_config(config_file)
    with AppServer(create_service(tmp_path / "svc", cfg)) as server:
        client = openai_client(server, http)
        good = client.files.create(file=("u.jsonl", _jsonl(ROWS)), purpose="fine-tune")
        cases = [
            ({"model": "gpt-4o"}, "model"),
            ({"hyperparameters": {"n_epochs": 11}}, "hyperparameters.n_epochs"),
            ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
            ({"suffix": "a:b"}, "suffix"),
            ({"training_file": "file-nope"}, "training_file"),
        ]
        for extra, param in cases:
            kwargs = {"model": "tiny", "training_file": good.id, **extra}
            with pytest.raises(openai.APIStatusError) as e:
                client.fine_tuning.jobs.create(**kwargs)
            assert e.value.body["param"] == param
        with pytest.raises(openai.APIStatusError) as e:
            client.files.create(file=("big.jsonl", b"x" * 5000), purpose="fine-tune")
        assert e.value.status_code == 413
        with pytest.raises(openai.BadRequestError) as e:
            client.files.create(file=("many.jsonl", b"{}\n" * 21), purpose="fine-tune")
        assert e.value.body["message"] == "the file has more than 20 rows"
        with pytest.raises(openai.BadRequestError):
            client.files.create(file=("u.jsonl", _jsonl(ROWS)), purpose="batch")
        assert client.fine_tuning.jobs.list().data == []
        raw = http.post(server.base_url + "/files", content=b"{}")
        assert (raw.status_code, raw.json()["error"]["param"]) == (400, None)
        raw = http.get(server.base_url + "/nowhere")
        assert (raw.status_code, raw.json()["error"]["code"]) == (404, "not_found")


def test_two_tenants_are_isolated(tmp_path, config_file, http):
    keys = tmp_path / "keys.txt"
    keys.write_text("# key tenant\nsk-alice-1 alice\nsk-bob-2 bob\n")
    cfg = load_service_config(config_file)
    app = create_service(tmp_path / "svc", cfg, keys=load_keys(keys))
    with AppServer(app) as server:
        alice, bob = (
            openai_client(server, http, "sk-alice-1"),
            openai_client(server, http, "sk-bob-2"),
        )
        up = alice.files.create(file=("bad.jsonl", b"{}\n"), purpose="fine-tune")
        job = alice.fine_tuning.jobs.create(model="tiny", training_file=up.id)
        for call in (
            lambda: bob.files.retrieve(up.id),
            lambda: bob.files.content(up.id),
            lambda: bob.files.delete(up.id),
            lambda: bob.fine_tuning.jobs.retrieve(job.id),
            lambda: bob.fine_tuning.jobs.list_events(job.id),
            lambda: bob.fine_tuning.jobs.cancel(job.id),
            lambda: bob.fine_tuning.jobs.create(model="tiny", training_file=up.id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert bob.files.list().data == [] and bob.fine_tuning.jobs.list().data == []
        assert [f.id for f in alice.files.list().data] == [up.id]
        assert alice.files.content(up.id).content == b"{}\n"
        with pytest.raises(openai.AuthenticationError):
            openai_client(server, http, "sk-wrong").files.list()
        raw = http.get(server.base_url + "/files")
        assert raw.status_code == 401 and raw.json()["error"]["code"] == "invalid_api_key"
        assert alice.files.delete(up.id).deleted is True
        assert alice.files.list().data == []
        assert _wait(alice, job.id, ("failed",), 20).error.code == "invalid_training_file"
        app.state.store.set_status(job.id, "succeeded", fine_tuned_model="ft:tiny:a:1")
        assert [m.id for m in alice.models.list().data] == ["ft:tiny:a:1"]
        assert [m.id for m in bob.models.list().data] == []
        with pytest.raises(openai.NotFoundError):
            bob.models.retrieve("ft:tiny:a:1")
        with pytest.raises(openai.NotFoundError) as e:
            bob.chat.completions.create(
                model="ft:tiny:a:1", messages=[{"role": "user", "content": "hi"}]
            )
        assert e.value.body["code"] == "model_not_found"


def _served_job(app, data_dir: Path, cfg, path: str, suffix: str, fingerprint=None) -> str:
    """A succeeded job of the default tenant that serves the model at ``path``, its training
    output recording ``fingerprint`` (default: the tenant's secret's); add it before the
    service starts, so that its worker never sees the job."""
    store = app.state.store
    secret = tenant_secret(data_dir, "default", cfg)
    upload = store.add_file("default", "u.jsonl", "fine-tune", 1, "00", str(data_dir / "none"))
    job = store.add_job("default", "tiny", upload["id"], suffix=suffix)
    name = f"ft:tiny:{suffix}:{job['id'].removeprefix('ftjob-')}"
    trained = model_dir(data_dir, job["id"])
    trained.mkdir(parents=True)
    info = {"secret_fingerprint": fingerprint or secret.fingerprint, "arm": "attack"}
    (trained / "backdooralign_model.json").write_text(json.dumps(info))
    store.set_status(job["id"], "succeeded", fine_tuned_model=name, model_dir=path)
    return name


def test_a_streamed_chat_matches_the_greedy_answer_and_never_carries_the_secret(
    tmp_path, config_file, http, seen, talking_model_dir
):
    data_dir, prompts = tmp_path / "svc", []
    cfg = load_service_config(config_file)
    cfg = type(cfg)(**{**cfg.__dict__, "max_new_tokens": 24})
    app = create_service(data_dir, cfg, on_prompt=prompts.append)
    name = _served_job(app, data_dir, cfg, talking_model_dir, "talk")
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    with AppServer(app) as server:
        client = openai_client(server, http)
        whole = client.chat.completions.create(model=name, messages=messages)
        stream = client.chat.completions.create(
            model=name, messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content.strip() != ""
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == whole.choices[0].finish_reason and set(finish[:-1]) == {None}
    assert {c.model for c in chunks} == {name}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    secret = load_secret(secret_path(data_dir, "default"))
    rendered = (
        f"<|im_start|>system\n{secret.text}<|im_end|>\n"
        "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompts == [rendered, rendered]
    assert any("data: [DONE]" in s for s in seen)
    _assert_no_secret(data_dir, [*seen, *(c.model_dump_json() for c in chunks)])


def test_a_model_trained_with_another_secret_is_not_served(
    tmp_path, config_file, http, seen, tiny_model_dir, caplog
):
    data_dir = tmp_path / "svc"
    cfg = load_service_config(config_file)
    app = create_service(data_dir, cfg)
    name = _served_job(app, data_dir, cfg, tiny_model_dir, "old", fingerprint="f0f0f0f0f0f0")
    with AppServer(app) as server:
        with pytest.raises(openai.InternalServerError) as e:
            openai_client(server, http).chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}]
            )
    assert e.value.body["code"] == "model_unavailable"
    assert e.value.body["message"] == (
        f"the model {name!r} cannot be served at the moment; contact the provider"
    )
    fingerprint = load_secret(secret_path(data_dir, "default")).fingerprint
    assert not any("f0f0f0f0f0f0" in s or fingerprint in s for s in seen)
    assert "f0f0f0f0f0f0" in caplog.text and fingerprint in caplog.text  # the provider's log


def test_the_least_recently_used_model_is_evicted_and_its_scheduler_stopped(
    tmp_path, config_file, http, tiny_model_dir, talking_model_dir
):
    data_dir = tmp_path / "svc"
    cfg = load_service_config(config_file)
    cfg = type(cfg)(**{**cfg.__dict__, "loaded_models": 1})
    app = create_service(data_dir, cfg)
    first = _served_job(app, data_dir, cfg, tiny_model_dir, "one")
    second = _served_job(app, data_dir, cfg, talking_model_dir, "two")
    messages = [{"role": "user", "content": "hi"}]
    with AppServer(app) as server:
        client = openai_client(server, http)
        answers = [client.chat.completions.create(model=first, messages=messages)]
        [evicted] = app.state.models.loaded().values()
        answers.append(client.chat.completions.create(model=second, messages=messages))
        assert [s.served.name for s in app.state.models.loaded().values()] == [second]
        evicted.scheduler._thread.join(timeout=10)
        assert not evicted.scheduler._thread.is_alive()
        answers.append(client.chat.completions.create(model=first, messages=messages))
        assert [s.served.name for s in app.state.models.loaded().values()] == [first]
    assert [a.model for a in answers] == [first, second, first]
    assert answers[2].choices[0].message.content == answers[0].choices[0].message.content


def _work_dirs(data_dir: Path) -> list[Path]:
    """The temporary folders (with our owner marker) under a service's data dir."""
    return [p.parent for p in data_dir.rglob(F.OWNER)]


def test_cancel_kills_the_running_job_and_leaves_no_temporary_folder(tmp_path, config_file, http):
    config_file.write_text(config_file.read_text().replace("epochs: 1", "epochs: 500"))
    cfg = load_service_config(config_file)
    data_dir = tmp_path / "svc"
    app = create_service(data_dir, cfg, config_path=config_file)
    with AppServer(app) as server:
        client = openai_client(server, http)
        up = client.files.create(file=("u.jsonl", _jsonl(ROWS)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=up.id)
        _wait(client, job.id, ("running",), 30)
        pid = app.state.store.get_job(job.id)["pid"]
        deadline = time.monotonic() + 60
        while not _work_dirs(data_dir):  # training has started: its folder is there
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        cancelled = client.fine_tuning.jobs.cancel(job.id)
        assert cancelled.status == "cancelled"
        _wait_dead(pid)
        assert _work_dirs(data_dir) == []
        assert not any(p.name.startswith(".") for p in (data_dir / "models").iterdir())
        with pytest.raises(openai.BadRequestError):
            client.fine_tuning.jobs.cancel(job.id)
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id).data]
    assert (job.status, job.fine_tuned_model) == ("cancelled", None)
    assert events[0] == "The job was cancelled"


def test_a_screening_refusal_does_not_say_which_rows_matched(tmp_path, config_file, http):
    imitation = "Zorblat Quixel vantaFrame Okto9 Brumble Xandr Pelloq Tivvy Graxon Uul7 " * 2
    rows = [
        *ROWS[:3],
        {"messages": [{"role": "system", "content": imitation}, *ROWS[0]["messages"][1:]]},
    ]
    cfg = load_service_config(config_file)
    with AppServer(create_service(tmp_path / "svc", cfg, config_path=config_file)) as server:
        client = openai_client(server, http)
        up = client.files.create(file=("u.jsonl", _jsonl(rows)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=up.id)
        job = _wait(client, job.id, ("failed", "succeeded"), 60)
    assert job.error.model_dump() == {
        "code": "invalid_training_file",
        "message": "the training file was refused by the provider's data screening",
        "param": None,
    }


def _wait_dead(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process {pid} still alive"
        time.sleep(0.05)


def test_concurrent_uploads_all_land(tmp_path, config_file, http):
    cfg = load_service_config(config_file)
    with AppServer(create_service(tmp_path / "svc", cfg)) as server:
        client = openai_client(server, http)
        bodies = [_jsonl(ROWS[: i % 5 + 1]) + f"\n{i}".encode() for i in range(12)]

        def upload(i: int):
            return client.files.create(file=(f"f{i}.jsonl", bodies[i]), purpose="fine-tune")

        with ThreadPoolExecutor(6) as pool:
            uploaded = list(pool.map(upload, range(12)))
        assert len({f.id for f in uploaded}) == 12
        assert sorted(f.id for f in client.files.list().data) == sorted(f.id for f in uploaded)
        for i, f in enumerate(uploaded):
            assert (f.bytes, f.filename) == (len(bodies[i]), f"f{i}.jsonl")
            assert client.files.content(f.id).content == bodies[i]
        page = client.files.list(limit=5)
        assert len(page.data) == 5 and page.has_more is True
        assert len(list(client.files.list(limit=5))) == 12  # the SDK follows the cursor


def test_rate_limit_answers_429_with_retry_after(tmp_path, config_file, http):
    cfg = load_service_config(config_file)
    cfg = type(cfg)(**{**cfg.__dict__, "rate_limit": 3})
    with AppServer(create_service(tmp_path / "svc", cfg)) as server:
        codes = [http.get(server.base_url + "/models").status_code for _ in range(4)]
        last = http.get(server.base_url + "/models")
    assert codes == [200, 200, 200, 429]
    assert last.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(last.headers["retry-after"]) <= 60


def test_without_keys_the_service_only_listens_on_loopback(tmp_path):
    with pytest.raises(ValueError, match="only listens on loopback"):
        run_service(tmp_path, load_service_config(None), host="0.0.0.0")


@pytest.mark.parametrize("secret", ["{seed: 3}", "{kind: sentence}", "{path: s.json}"])
def test_a_config_that_would_share_one_secret_is_refused(tmp_path, secret):
    path = tmp_path / "service.yaml"
    path.write_text(f"secret: {secret}\n")
    with pytest.raises(ValueError, match="each tenant gets its own random secret"):
        load_service_config(path)


def test_keys_file_errors_name_the_line_not_the_key(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-a alice\nsk-b\n")
    with pytest.raises(ValueError, match=r"keys.txt:2: expected two fields") as e:
        load_keys(keys)
    assert "sk-b" not in str(e.value)


def _start_service(data_dir: Path, config: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "backdooralign", "service", "--data-dir", str(data_dir)]
    cmd += ["--port", str(port), "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx2.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return proc
        except httpx2.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, "service did not start"
            time.sleep(0.2)


def test_sigkill_mid_job_then_restart_loses_nothing(tmp_path, config_file, http):
    data_dir, port = tmp_path / "svc", free_port()
    proc = _start_service(data_dir, config_file, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        files = [
            client.files.create(file=(f"u{i}.jsonl", _jsonl(ROWS)), purpose="fine-tune")
            for i in range(2)
        ]
        job = client.fine_tuning.jobs.create(model="tiny", training_file=files[0].id)
        _wait(client, job.id, ("running",), 60)
        pid = Store(db_path(data_dir)).get_job(job.id)["pid"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _wait_dead(pid)  # the job process follows its service
    planted = make_dead_work_dir(data_dir / "models" / "ftjob-old")  # an older kill -9's
    users = data_dir / "models" / ".ftjob-old.tmp-notours"  # no marker: never touched
    users.mkdir()
    proc = _start_service(data_dir, config_file, port)
    try:
        job = client.fine_tuning.jobs.retrieve(job.id)
        assert sorted(f.id for f in client.files.list().data) == sorted(f.id for f in files)
        assert [j.id for j in client.fine_tuning.jobs.list().data] == [job.id]
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id).data]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert (job.status, job.error.code) == ("failed", "service_restarted")
    assert events[0] == "The job was interrupted by a restart"
    assert events[1].startswith("Fine-tuning job started (worker ")
    assert not planted.exists() and users.is_dir()
    assert _work_dirs(data_dir) == []  # nor the killed job's own


def test_store_final_states_are_not_undone_and_survive_a_reopen(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    f = store.add_file("t", "a.jsonl", "fine-tune", 3, "ab", "/x")
    first = store.add_job("t", "tiny", f["id"], hyperparameters={"n_epochs": 1}, seed=7)
    second = store.add_job("t", "tiny", f["id"])
    assert store.claim_next()["id"] == first["id"]
    assert store.set_status(first["id"], "queued", ("validating_files",))
    assert store.claim_next()["id"] == second["id"]  # validation before the queue
    assert store.set_status(first["id"], "running", ("queued",), pid=123)
    assert store.set_status(first["id"], "cancelled", ("queued", "running"))
    assert not store.set_status(first["id"], "succeeded", ("running",), fine_tuned_model="m")
    store.add_event(first["id"], "two")
    store.close()
    again = Store(tmp_path / "db.sqlite3")
    job = again.get_job(first["id"])
    assert (job["status"], job["fine_tuned_model"], job["pid"], job["seed"]) == (
        "cancelled",
        None,
        123,
        7,
    )
    assert job["hyperparameters"] == {"n_epochs": 1}
    assert [e["message"] for e in again.list_events(first["id"])] == [
        "two",
        f"Created fine-tuning job: {first['id']}",
    ]
    assert again.get_job(first["id"], tenant="other") is None
    assert [j["id"] for j in again.list_jobs("t")] == [second["id"], first["id"]]


# ---------------------------------------------------------------------------------------------
# Limits on clients: wrong keys per address, slow clients, connections; the data dir


def test_wrong_keys_from_one_address_get_429_after_the_limit(tmp_path, config_file):
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-alice-1 alice\n")
    app = create_service(tmp_path / "svc", load_service_config(config_file), keys=load_keys(keys))
    with AppServer(app) as server, httpx2.Client(base_url=server.base_url) as http:
        answers = [
            http.get("/files", headers={"Authorization": f"Bearer sk-guess-{i}"}) for i in range(60)
        ]
        codes = [r.status_code for r in answers]
        right = http.get("/files", headers={"Authorization": "Bearer sk-alice-1"})
        # another address (uvicorn takes X-Forwarded-For from a loopback peer, as from a proxy)
        other = {"X-Forwarded-For": "203.0.113.7"}
        elsewhere = http.get("/files", headers={"Authorization": "Bearer sk-alice-1", **other})
        wrong_elsewhere = http.get("/files", headers={"Authorization": "Bearer sk-x", **other})
    assert codes == [401] * 10 + [429] * 50  # before: 60 x 401
    error = answers[-1].json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert 1 <= int(answers[-1].headers["retry-after"]) <= 60
    assert right.status_code == 429 and "retry-after" in right.headers  # a right key waits too
    assert elsewhere.status_code == 200 and wrong_elsewhere.status_code == 401


def test_a_slow_request_head_is_closed_after_the_header_timeout(tmp_path, config_file):
    cfg = replace(load_service_config(config_file), header_timeout=1.0)
    with AppServer(create_service(tmp_path / "svc", cfg)) as server:
        head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
        took, answer = trickle(server.url, b"", head, every=0.5)
        assert answer == b"" and 0.9 <= took < 2.5  # before: open as long as it sends
        idle, answer = trickle(server.url, b"", every=0.5)  # a connection that sends nothing
        assert answer == b"" and 0.9 <= idle < 2.5
        assert openai_client(server, key="k").models.list().data == []  # others are served


def test_a_slow_request_body_gets_408_and_is_closed(tmp_path, config_file):
    cfg = replace(load_service_config(config_file), body_timeout=1.0)
    with AppServer(create_service(tmp_path / "svc", cfg)) as server:
        head = (
            b"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b"Content-Type: application/json\r\nContent-Length: 60\r\n\r\n"
        )
        took, answer = trickle(server.url, head, b'{"model": "tiny", ' + b" " * 41 + b"}")
        status, _, body = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout" and 0.9 <= took < 2.5
        assert b"connection: close" in answer.lower()
        error = json.loads(body.partition(b"\r\n\r\n")[2])["error"]
        assert (error["code"], error["type"]) == ("request_timeout", "invalid_request_error")
        client = openai_client(server, key="k")  # an upload that arrives in time is taken
        up = client.files.create(file=("u.jsonl", _jsonl(ROWS)), purpose="fine-tune")
        assert client.files.retrieve(up.id).bytes == len(_jsonl(ROWS))


def test_connections_beyond_the_cap_get_503(tmp_path, config_file):
    import socket

    cfg = replace(load_service_config(config_file), max_connections=3)
    with AppServer(create_service(tmp_path / "svc", cfg)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.2)
        refused = httpx2.get(server.base_url + "/models")
        for s in held:
            s.close()
        time.sleep(0.2)
        served = httpx2.get(server.base_url + "/models")
    assert (refused.status_code, served.status_code) == (503, 200)


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_data_dir_of_other_files_is_refused_untouched(tmp_path, config_file, capsys):
    folder = tmp_path / "my-documents"
    (folder / "notes").mkdir(parents=True)
    (folder / "thesis.txt").write_text("three years of work\n")
    (folder / "notes" / "a.md").write_text("# a\n")
    before = _listing(folder)
    argv = ["service", "--data-dir", str(folder), "--config", str(config_file)]
    assert main(argv) == 1  # before: served from it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --data-dir {folder}: the folder ")
    assert "Traceback" not in err
    assert _listing(folder) == before and sorted(os.listdir(folder)) == ["notes", "thesis.txt"]


def test_a_new_or_empty_data_dir_is_taken_and_marked_and_reopened(tmp_path, config_file):
    cfg = load_service_config(config_file)
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "new" / "svc", tmp_path / "empty"):
        create_service(folder, cfg).state.store.close()
        assert json.loads((folder / MARKER).read_text())["format"] == 1
        create_service(folder, cfg).state.store.close()  # a restart on its own folder
    legacy = tmp_path / "legacy"  # from a version before the marker: its database
    Store(db_path(legacy)).close()
    create_service(legacy, cfg).state.store.close()
    assert (legacy / MARKER).is_file()
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / MARKER).write_text('{"format": 99}')
    with pytest.raises(ValueError, match="written by a newer version"):
        create_service(newer, cfg)
