"""The fine-tuning service on a real PostgreSQL (a throwaway cluster, :mod:`pg_cluster`): the
store against SQLite's behaviour, concurrent claims, and several API servers and workers (real
processes of ``backdooralign service``) on one database, driven by the real ``openai`` SDK.

Skipped, with the reason, where PostgreSQL's server or psycopg is not installed (``make test``
installs both).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import openai
import pg_cluster
import pytest
from conftest import free_port
from test_service import ROWS, _jsonl, _wait, _wait_dead, _work_dirs

from backdooralign.service.store import MIGRATIONS, Store, shown_database
from backdooralign.service.store_pg import open_store
from backdooralign.service.worker import worker_name

psycopg = pytest.importorskip("psycopg", reason="psycopg (the postgres extra) is not installed")
if pg_cluster.server_bin() is None:
    pytest.skip(
        "PostgreSQL's server is not installed (make test installs it)", allow_module_level=True
    )

SRC = str(Path(__file__).parent.parent / "src")


@pytest.fixture(scope="module")
def cluster():
    with pg_cluster.Cluster() as c:
        yield c


@pytest.fixture
def pg_url(cluster) -> str:
    return cluster.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    """Each store test runs on both: what the service relies on is the same."""
    if request.param == "sqlite":
        return str(tmp_path / "db.sqlite3")
    return request.getfixturevalue("cluster").new_database()


# ---------------------------------------------------------------------------------------------
# The store: the same answers on both databases


def test_final_states_are_not_undone_and_survive_a_reopen(database):
    store = open_store(database)
    f = store.add_file("t", "a.jsonl", "fine-tune", 3, "ab", "/x")
    g = store.add_file("t", "b.jsonl", "fine-tune", 4, "cd", "/y")
    first = store.add_job("t", "tiny", f["id"], hyperparameters={"n_epochs": 1}, seed=7)
    second = store.add_job("t", "tiny", f["id"])
    assert store.claim_next("w1")["id"] == first["id"]
    assert store.claim_next("w2")["id"] == second["id"]  # the first is w1's while leased
    assert store.claim_next("w3") is None
    assert store.set_status(first["id"], "queued", ("validating_files",), worker=None)
    claimed = store.claim_next("w3")
    assert (claimed["id"], claimed["attempts"], claimed["worker"]) == (first["id"], 1, "w3")
    assert not store.set_status(first["id"], "running", ("queued",), "w1", pid=1)  # not w1's
    assert store.set_status(first["id"], "running", ("queued",), "w3", pid=123)
    assert store.set_status(first["id"], "cancelled", ("queued", "running"))
    assert not store.set_status(first["id"], "succeeded", ("running",), fine_tuned_model="m")
    assert not store.renew_lease(first["id"], "w3", 30)  # a cancel: the worker ends the job
    store.add_event(first["id"], "two")
    store.close()
    again = open_store(database)
    assert again.migrate() == [] and again.schema_version() == MIGRATIONS[-1][0]
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
    assert [r["id"] for r in again.list_files("t")] == [g["id"], f["id"]]
    again.delete_file(g["id"])
    assert [r["id"] for r in again.list_files("t")] == [f["id"]]


def test_a_lost_lease_is_given_back_once_then_the_job_fails(database):
    store = open_store(database)
    f = store.add_file("t", "a.jsonl", "fine-tune", 3, "ab", "/x")
    job = store.add_job("t", "tiny", f["id"])
    store.set_status(job["id"], "queued", ("validating_files",))
    error = {"code": "worker_lost", "message": "gone", "param": None}
    for attempt, expected in ((1, "queued"), (2, "failed")):
        claimed = store.claim_next(f"w{attempt}", lease_s=0.05, attempts=2)
        assert (claimed["id"], claimed["attempts"]) == (job["id"], attempt)
        assert store.set_status(job["id"], "running", ("queued",), f"w{attempt}")
        time.sleep(0.1)
        assert [j["id"] for j in store.expired_leases()] == [job["id"]]
        late = {**claimed, "worker": "someone-else"}
        assert store.release(late, 2, error, "lost") is None  # only the holder's can go
        assert store.release(claimed, 2, error, "lost") == expected
    assert store.claim_next("w3", attempts=2) is None
    row = store.get_job(job["id"])
    assert (row["status"], row["error"], row["attempts"]) == ("failed", error, 2)
    messages = [e["message"] for e in store.list_events(job["id"])]
    assert messages[:2] == ["lost", "lost; the job is queued again"]


def test_concurrent_claims_take_each_job_once(database):
    setup = open_store(database)
    f = setup.add_file("t", "a.jsonl", "fine-tune", 3, "ab", "/x")
    ids = {setup.add_job("t", "tiny", f["id"])["id"] for _ in range(40)}
    taken: dict[str, list[str]] = {}
    lock, start = threading.Lock(), threading.Barrier(6)

    def claimer(name: str) -> None:
        store = open_store(database)  # a connection of its own, as another process has
        start.wait()
        while (job := store.claim_next(name, lease_s=600)) is not None:
            with lock:
                taken.setdefault(job["id"], []).append(name)
        store.close()

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(taken) == ids
    assert all(len(who) == 1 for who in taken.values())
    assert {r["worker"] for r in setup.list_jobs()} == {w for who in taken.values() for w in who}


def test_migrations_run_once_when_servers_start_together(pg_url):
    stores, errors = [], []

    def start() -> None:
        try:
            stores.append(open_store(pg_url))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert sorted(versions) == [v for v, _, _ in MIGRATIONS]


def test_an_sqlite_database_from_before_leases_is_migrated(tmp_path):
    import sqlite3

    from backdooralign.service.store import _SCHEMA_SQLITE

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA_SQLITE)
    old.execute(
        "INSERT INTO jobs (id, tenant, model, training_file, hyperparameters, seed, status, "
        "created_at) VALUES ('ftjob-1', 't', 'tiny', 'file-1', '{}', 0, 'queued', 1)"
    )
    old.commit()
    old.close()
    store = Store(path)
    assert store.schema_version() == MIGRATIONS[-1][0]
    claimed = store.claim_next("w")
    assert (claimed["id"], claimed["attempts"], claimed["worker"]) == ("ftjob-1", 1, "w")


def test_a_database_that_does_not_answer_is_one_line_without_the_password():
    port = free_port()  # nothing listens there
    with pytest.raises(ConnectionError) as e:
        open_store(f"postgresql://svc:hunter2@127.0.0.1:{port}/db?connect_timeout=3")
    message = str(e.value)
    assert "hunter2" not in message and "\n" not in message
    assert message.startswith(f"--database postgresql://svc:***@127.0.0.1:{port}/db")
    assert shown_database("postgresql://a@h/db") == "postgresql://a@h/db"


# ---------------------------------------------------------------------------------------------
# Several API servers and workers on one database: real processes


class Fleet:
    """API servers (``--role api``) and workers (``--role worker``) of one service."""

    def __init__(self, tmp_path: Path, config: Path, url: str, keys: Path):
        self.data_dir, self.config, self.url, self.keys = tmp_path / "shared", config, url, keys
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}  # worker id -> its process

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "backdooralign", "service", "--data-dir", str(self.data_dir)]
        cmd += ["--config", str(self.config), "--database", self.url, "--keys", str(self.keys)]
        out = open(self.logs / f"{name}.txt", "wb")  # noqa: SIM115 - the process keeps it
        proc = subprocess.Popen([*cmd, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def api(self, name: str) -> str:
        port = free_port()
        proc = self._start(name, "--role", "api", "--port", str(port))
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx2.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                return f"http://127.0.0.1:{port}/v1"
            except httpx2.TransportError:
                assert proc.poll() is None, (self.logs / f"{name}.txt").read_text()[-2000:]
                assert time.monotonic() < deadline, f"{name} did not start"
                time.sleep(0.2)

    def worker(self, name: str) -> str:
        """Start a worker; returns its id (from its first line, once it is claiming jobs)."""
        proc = self._start(name, "--role", "worker")
        log, deadline = self.logs / f"{name}.txt", time.monotonic() + 60
        while True:
            for line in log.read_text().splitlines():
                if line.startswith("fine-tuning worker "):
                    wid = line.split()[2]
                    self.workers[wid] = proc
                    return wid
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def fleet(tmp_path, tiny_model_dir, pg_url):
    config = tmp_path / "service.yaml"
    config.write_text(
        f"base_model: {tiny_model_dir}\n"
        "base_model_name: tiny\n"
        "secret: {length: 12}\n"
        "train: {epochs: 1, batch_size: 4, max_length: 256, bf16: false}\n"
        "max_new_tokens: 6\n"
        "max_rows: 20\n"
        "lease_seconds: 2\n"
        "job_attempts: 2\n"
    )
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-alice alice\nsk-bob bob\n")
    fleet = Fleet(tmp_path, config, pg_url, keys)
    yield fleet
    fleet.stop()


def _client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)


def _started_by(client: openai.OpenAI, job_id: str) -> list[str]:
    """The workers that started a job, oldest first (from its events)."""
    events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
    found = [e.message for e in reversed(events) if e.message.startswith("Fine-tuning job started")]
    return [m.removeprefix("Fine-tuning job started (worker ").rstrip(")") for m in found]


def _wait_event(client: openai.OpenAI, job_id: str, message: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while message not in [e.message for e in client.fine_tuning.jobs.list_events(job_id).data]:
        assert time.monotonic() < deadline, f"no event {message!r}"
        time.sleep(0.2)


def test_two_servers_and_two_workers_run_each_of_12_jobs_once(fleet):
    servers = [fleet.api("api1"), fleet.api("api2")]
    workers = {worker_name(w) for w in (fleet.worker("w1"), fleet.worker("w2"))}
    clients = {
        (s, who): _client(url, f"sk-{who}")
        for s, url in enumerate(servers)
        for who in ("alice", "bob")
    }
    jobs = []  # (tenant, job id)
    for i in range(12):
        who = ("alice", "bob")[i % 2]
        client = clients[(i // 2) % 2, who]  # both tenants on both servers
        up = client.files.create(file=(f"u{i}.jsonl", _jsonl(ROWS)), purpose="fine-tune")
        jobs.append((who, client.fine_tuning.jobs.create(model="tiny", training_file=up.id).id))
    for who, jid in jobs:
        job = _wait(clients[1, who], jid, ("succeeded", "failed", "cancelled"), 400)
        assert job.status == "succeeded", job.error
    started = {jid: _started_by(clients[0, who], jid) for who, jid in jobs}
    assert all(len(w) == 1 for w in started.values()), started  # each ran exactly once
    assert {w[0] for w in started.values()} == workers  # both workers took jobs
    # the tenants stay isolated, whichever server is asked
    for s in (0, 1):
        for who in ("alice", "bob"):
            mine = {jid for owner, jid in jobs if owner == who}
            listed = {j.id for j in clients[s, who].fine_tuning.jobs.list(limit=100).data}
            assert listed == mine
            models = {m.id for m in clients[s, who].models.list().data}
            assert len(models) == 6
            other = next(jid for owner, jid in jobs if owner != who)
            with pytest.raises(openai.NotFoundError):
                clients[s, who].fine_tuning.jobs.retrieve(other)
    assert len(list((fleet.data_dir / "secrets").glob("*.json"))) == 2  # one per tenant
    # a fine-tuned model answers from either server
    alice = next(jid for owner, jid in jobs if owner == "alice")
    model = clients[0, "alice"].fine_tuning.jobs.retrieve(alice).fine_tuned_model
    answer = clients[1, "alice"].chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name a colour."}]
    )
    assert answer.choices[0].message.content is not None


def test_a_cancel_on_one_server_ends_the_job_a_worker_runs(fleet, pg_url):
    first, second = fleet.api("api1"), fleet.api("api2")
    fleet.worker("w1")
    fleet.config.write_text(fleet.config.read_text().replace("epochs: 1", "epochs: 500"))
    a, b = _client(first, "sk-alice"), _client(second, "sk-alice")
    up = a.files.create(file=("u.jsonl", _jsonl(ROWS)), purpose="fine-tune")
    job = a.fine_tuning.jobs.create(model="tiny", training_file=up.id)
    _wait(a, job.id, ("running",), 180)
    pid = open_store(pg_url).get_job(job.id)["pid"]
    _wait_event(a, job.id, "Training started")
    assert b.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # an API-only server
    _wait_dead(pid, 30)  # the worker saw it and ended the job's process
    deadline = time.monotonic() + 30
    while _work_dirs(fleet.data_dir):
        assert time.monotonic() < deadline, "the job's temporary folders stayed"
        time.sleep(0.1)
    time.sleep(1.0)
    job = a.fine_tuning.jobs.retrieve(job.id)
    assert (job.status, job.fine_tuned_model) == ("cancelled", None)


def test_a_worker_killed_mid_job_hands_it_to_the_other_worker(fleet, pg_url):
    server = fleet.api("api1")
    fleet.config.write_text(fleet.config.read_text().replace("epochs: 1", "epochs: 500"))
    first = fleet.worker("w1")
    client = _client(server, "sk-alice")
    ups = [
        client.files.create(file=(f"u{i}.jsonl", _jsonl(ROWS)), purpose="fine-tune") for i in (0, 1)
    ]
    job = client.fine_tuning.jobs.create(model="tiny", training_file=ups[0].id)
    _wait(client, job.id, ("running",), 180)
    store = open_store(pg_url)
    row = store.get_job(job.id)
    assert row["worker"] == first
    fleet.worker("w2")  # idle until the first one's lease runs out
    fleet.workers[first].send_signal(signal.SIGKILL)
    fleet.workers[first].wait()
    _wait_dead(row["pid"], 40)  # its job process follows its worker
    fleet.config.write_text(fleet.config.read_text().replace("epochs: 500", "epochs: 1"))
    done = _wait(client, job.id, ("succeeded", "failed", "cancelled"), 300)
    assert done.status == "succeeded", done.error
    events = [e.message for e in reversed(client.fine_tuning.jobs.list_events(job.id).data)]
    lost = f"The worker running this job ({worker_name(first)}) stopped answering"
    assert f"{lost}; the job is queued again" in events
    started = _started_by(client, job.id)
    assert started[0] == worker_name(first) and len(started) == 2 and started[1] != started[0]
    # the second start came after the first worker was declared lost: never both at once
    assert (
        events.index(f"{lost}; the job is queued again")
        < len(events) - events[::-1].index(f"Fine-tuning job started (worker {started[1]})") - 1
    )
    assert store.get_job(job.id)["attempts"] == 2
    assert sorted(f.id for f in client.files.list().data) == sorted(u.id for u in ups)
    assert [j.id for j in client.fine_tuning.jobs.list().data] == [job.id]
    assert (fleet.data_dir / "models" / job.id).is_dir()
    assert json.loads((fleet.data_dir / "backdooralign-service.json").read_text())["format"] == 1
