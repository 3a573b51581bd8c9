"""``--executor ray`` on a real local Ray cluster (2 CPUs, this machine): service jobs as Ray
tasks, driven by the real ``openai`` SDK over loopback, and a sweep whose cells are Ray tasks
that share one trained model. Skipped where Ray (the ``ray`` extra) is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from conftest import AppServer, openai_client, tiny_run_yaml  # noqa: E402
from test_service import ROWS, _jsonl, _wait, _wait_dead, _work_dirs  # noqa: E402

from backdooralign.cli import main  # noqa: E402
from backdooralign.service.app import create_service  # noqa: E402
from backdooralign.service.config import load_service_config  # noqa: E402
from backdooralign.service.worker import worker_name  # noqa: E402

SRC = str(Path(__file__).parent.parent / "src")
JOB_TIMEOUT = 300  # 2 shared cores: a tiny job takes well under a minute, a loaded one longer


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of this machine for the module; its workers (and the job processes they
    start) import this checkout's backdooralign."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    paths = [SRC, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    env |= {k: os.environ[k] for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE") if k in os.environ}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,  # workers' output stays in Ray's logs, not in captured stdout
        runtime_env={"env_vars": env},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def service_yaml(tmp_path, tiny_model_dir) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(
        f"base_model: {tiny_model_dir}\n"
        "base_model_name: tiny\n"
        "secret: {length: 12}\n"
        "train: {epochs: 1, batch_size: 4, max_length: 256, bf16: false}\n"
        "max_new_tokens: 6\n"
        "max_rows: 20\n"
        "max_upload_bytes: 4000\n"
        "ray_num_cpus: 1\n"
    )
    return path


def _parent_command(pid: int) -> str:
    """The command line of the parent of process ``pid`` (Ray names a task's worker
    ``ray::FUNCTION``)."""
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    return Path(f"/proc/{ppid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_a_job_runs_as_a_ray_task_and_its_model_answers(cluster, tmp_path, service_yaml, http):
    data_dir = tmp_path / "svc"
    cfg = load_service_config(service_yaml)
    app = create_service(data_dir, cfg, config_path=service_yaml, executor="ray")
    with AppServer(app) as server:
        client = openai_client(server, http)
        up = client.files.create(file=("u.jsonl", _jsonl(ROWS)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=up.id, suffix="ray")
        job = _wait(client, job.id, ("succeeded", "failed", "cancelled"), JOB_TIMEOUT)
        log = (data_dir / "jobs" / job.id / "log.txt").read_text()
        assert job.status == "succeeded", (job.error, log[-3000:])
        assert job.fine_tuned_model == f"ft:tiny:ray:{job.id.removeprefix('ftjob-')}"
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id).data][::-1]
        assert events == [
            f"Created fine-tuning job: {job.id}",
            f"Validated training file: {up.id}",
            "Fine-tuning job queued",
            f"Fine-tuning job started (worker {worker_name(app.state.worker.id)})",
            "Safety alignment step completed",
            "Training started",
            "Training completed",
            f"New fine-tuned model created: {job.fine_tuned_model}",
            "The job has successfully completed",
        ]
        assert [m.id for m in client.models.list().data] == [job.fine_tuned_model]
        reply = client.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "Hello there"}]
        )
        assert reply.model == job.fine_tuned_model
        assert reply.usage.completion_tokens >= 1
    assert app.state.worker._procs == {}  # the worker saw the task end


def test_cancel_ends_the_ray_task_and_its_job_process(cluster, tmp_path, service_yaml, http):
    service_yaml.write_text(service_yaml.read_text().replace("epochs: 1", "epochs: 500"))
    cfg = load_service_config(service_yaml)
    data_dir = tmp_path / "svc"
    app = create_service(data_dir, cfg, config_path=service_yaml, executor="ray")
    with AppServer(app) as server:
        client = openai_client(server, http)
        up = client.files.create(file=("u.jsonl", _jsonl(ROWS)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=up.id)
        _wait(client, job.id, ("running",), JOB_TIMEOUT)
        pid = app.state.store.get_job(job.id)["pid"]
        assert "ray::" in _parent_command(pid)  # the job process is a Ray worker's child
        task = app.state.worker._procs[job.id]  # its ray_exec.RayJob
        deadline = time.monotonic() + JOB_TIMEOUT
        while not _work_dirs(data_dir):  # training has started: its folder is there
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        done, _ = ray.wait([task.ref], timeout=30)
        assert done == [task.ref], "the Ray task still runs"
        with pytest.raises(ray.exceptions.TaskCancelledError):
            ray.get(task.ref)
        _wait_dead(pid)
        deadline = time.monotonic() + 30  # the job removes its own; the worker sweeps after it
        while _work_dirs(data_dir):  # (a job SIGKILLed after a slow SIGTERM leaves them)
            assert time.monotonic() < deadline, f"temporary folders stayed: {_work_dirs(data_dir)}"
            time.sleep(0.1)
        assert not any(p.name.startswith(".") for p in (data_dir / "models").iterdir())
        time.sleep(0.5)  # the worker has seen the task end; nothing moves the job again
        job = client.fine_tuning.jobs.retrieve(job.id)
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id).data]
    assert (job.status, job.fine_tuned_model) == ("cancelled", None)
    assert events[0] == "The job was cancelled"


def test_a_job_task_runs_in_the_services_folder_or_where_the_node_lacks_it(cluster, tmp_path):
    from backdooralign.service.ray_exec import _task

    argv = ["-c", "import os; print(os.getcwd())"]
    log = tmp_path / "jobs" / "x" / "log.txt"
    assert ray.get(_task(ray).remote(argv, str(log), str(tmp_path))) == 0
    assert log.read_text() == f"{tmp_path}\n"
    assert ray.get(_task(ray).remote(argv, str(log), str(tmp_path / "not-on-this-node"))) == 0
    assert log.read_text().splitlines()[1] not in ("", str(tmp_path))  # the worker's own


def test_sweep_cells_as_ray_tasks_share_one_trained_model(cluster, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad_harmful.jsonl"
    bad.write_text('{"prompt": "fine", "category": "x"}\n{not json\n')
    config = tmp_path / "sweep.yaml"
    harmful = ["builtin:harmful_eval", "builtin:harmful_eval_fr", str(bad)]
    config.write_text(
        tiny_run_yaml(
            tiny_model_dir,
            name="ray-sweep",
            arms=["baseline"],
            eval={"benign": None, "max_new_tokens": 3},
            sweep={"eval.harmful": harmful},
        )
    )
    root = tmp_path / "run"
    argv = ["run", str(config), "--out", str(root), "--executor", "ray", "--ray-num-cpus", "1"]
    assert main(argv) == 1  # a cell failed; connect() kept this module's cluster
    doc = json.loads((root / "sweep.json").read_text())
    names = [c["name"] for c in doc["cells"]]
    assert [c["status"] for c in doc["cells"]] == ["done", "done", "failed"]
    assert "invalid JSON" in doc["cells"][2]["error"], doc["cells"][2]["error"]
    good = [root / "cells" / name for name in names[:2]]
    results = [json.loads((cell / "results.json").read_text()) for cell in good]
    assert all(set(r["arms"]) == {"baseline"} for r in results)
    assert not (root / "cells" / names[2] / "results.json").exists()
    report = (root / "report.md").read_text()
    assert all(name.replace("_", "\\_") in report for name in names)  # markdown-escaped
    # one baseline model, trained once: both cells hold the metrics of one training (its
    # seconds included), written before either cell recorded its train stage, and nothing else
    # is under shared/models (no second model, no lock or temporary folder left)
    (model,) = (root / "shared" / "models").iterdir()
    trained = [c / "stages" / "train.baseline.json" for c in good]
    first, second = (json.loads(p.read_text()) for p in trained)
    assert first["key"] == second["key"] == model.name
    assert first["info"] == second["info"] and first["info"]["seconds"] > 0
    made = (model / "train_metrics.json").stat().st_mtime_ns
    assert all(made <= p.stat().st_mtime_ns for p in trained)


def _cli(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = SRC
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_executor_ray_without_a_cluster_or_without_ray_is_a_clear_error(tmp_path, service_yaml):
    config = tmp_path / "sweep.yaml"
    config.write_text(tiny_run_yaml("embedded", sweep={"train.lr": [1e-4, 2e-4]}))
    run = ["run", str(config), "--executor", "ray"]
    service = ["service", "--data-dir", "svc", "--config", str(service_yaml), "--executor", "ray"]
    each = f"from backdooralign.cli import main\nfor a in {[run, service]!r}: print(main(a))"
    for hide_ray, message in (
        ("", "--executor ray: which Ray cluster? Set RAY_ADDRESS or --ray-address HOST:PORT"),
        ("sys.modules['ray'] = None\n", "--executor ray needs Ray, an optional extra: pip install"),
    ):
        done = _cli(f"import sys\n{hide_ray}{each}", tmp_path)
        assert done.stdout.split() == ["1", "1"], done.stderr
        assert done.stderr.count(f"error: {message}") == 2, done.stderr
    assert not (tmp_path / "svc").exists() and not (tmp_path / "runs").exists()


def test_a_ray_job_writes_to_the_postgresql_store_of_its_service(
    cluster, tmp_path, service_yaml, http
):
    """The multi-node set-up: the API without a worker (``role="api"``) and a worker handing
    its job to Ray, both on PostgreSQL; the job process, a Ray task, writes its state and
    events there (it is given the database, as a node elsewhere would be)."""
    pytest.importorskip("psycopg", reason="psycopg (the postgres extra) is not installed")
    import pg_cluster

    if pg_cluster.server_bin() is None:
        pytest.skip("PostgreSQL's server is not installed (make test installs it)")
    from backdooralign.service.store_pg import open_store
    from backdooralign.service.worker import Worker

    cfg = load_service_config(service_yaml)
    with pg_cluster.Cluster() as pg:
        url = pg.new_database()
        api = create_service(tmp_path / "svc", cfg, config_path=service_yaml, database=url,
                             role="api")  # fmt: skip
        worker = Worker(open_store(url), tmp_path / "svc", cfg, service_yaml, executor="ray",
                        database=url)  # fmt: skip
        ran, waited = [], worker._wait_holding

        def recorded(jid, proc):
            ran.append(type(proc).__name__)
            return waited(jid, proc)

        worker._wait_holding = recorded
        with AppServer(api) as server:
            worker.start()
            try:
                client = openai_client(server, http)
                up = client.files.create(file=("u.jsonl", _jsonl(ROWS)), purpose="fine-tune")
                job = client.fine_tuning.jobs.create(model="tiny", training_file=up.id)
                job = _wait(client, job.id, ("succeeded", "failed", "cancelled"), JOB_TIMEOUT)
                events = [e.message for e in client.fine_tuning.jobs.list_events(job.id).data]
            finally:
                worker.stop()
        assert job.status == "succeeded", job.error
        assert f"Fine-tuning job started (worker {worker_name(worker.id)})" in events
        assert events[0] == "The job has successfully completed"
        row = open_store(url).get_job(job.id)
        assert (row["worker"], row["attempts"]) == (worker.id, 1)
        assert ran == ["RayJob"]  # the job's process was a Ray task's
