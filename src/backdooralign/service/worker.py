"""The service's job worker: validates new jobs, runs queued ones one at a time.

A thread of the service process (or of ``backdooralign service --role worker``, several of them
on one PostgreSQL database) claims the oldest waiting job from the :class:`Store`, under a lease
it renews while the job runs (``lease_seconds``). A cancel, from any API server, shows as a
lease that can no longer be renewed; the worker then ends the job's process. Each worker also
gives back the jobs of workers that died (their lease ran out): queued again while they have
attempts left (``job_attempts``), else failed (``worker_lost``). Jobs in
``validating_files`` are checked here (``chat_files.check_chat_file``: every error with its line
number, as the job's OpenAI-style error); queued jobs run in a process of their own
(``python -m backdooralign.service.job``), so the API keeps answering while a model trains, and a
cancel ends that process (SIGTERM, so its temporary folders go with it; SIGKILL if it has not
ended within :data:`KILL_AFTER_S`). A job process ends itself when the service dies, and
:meth:`Worker.recover`, at start-up, gives back at once the jobs a dead worker of this machine
left (a restart: ``service_restarted``) and removes the temporary folders dead processes left
in the data dir (those with our owner marker, of this host, only).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .. import files as F
from ..data.chat_files import check_chat_file
from ..data.formats import Problem
from .config import ServiceConfig
from .job import DATABASE_ENV, WORKER_ENV, job_dir, model_dir, worker_name
from .store import Store

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 10
KILL_AFTER_S = 10.0  # a job process that ignores SIGTERM this long is killed
RESTARTED = {
    "code": "service_restarted",
    "message": "the service stopped while this job was running; create the job again",
    "param": None,
}
WORKER_LOST = {
    "code": "worker_lost",
    "message": "the worker running this job stopped answering; create the job again",
    "param": None,
}
_INTERRUPTED = "The job was interrupted by a restart"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_here(worker: str | None) -> bool:
    """Whether ``worker`` (``HOST:PID:NAME``) was a process of this host that has ended."""
    host, _, rest = (worker or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not _pid_alive(int(pid))


def describe_errors(errors: Sequence[Problem]) -> str:
    """The errors with their line numbers (the first :data:`MAX_REPORTED_ERRORS`), for a
    customer: ``line 2: field 'prefixed': ...; line 5: ...``."""
    parts = []
    for p in errors[:MAX_REPORTED_ERRORS]:
        where = f"line {p.line}" if p.line else "file"
        field = f" field '{p.field}':" if p.field else ""
        parts.append(f"{where}:{field} {p.message}")
    more = len(errors) - MAX_REPORTED_ERRORS
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def validation_error(path: str | Path, file_id: str, cfg: ServiceConfig) -> dict | None:
    """The job error for an invalid training file (``None`` when it is valid): every error
    with its line number, the first :data:`MAX_REPORTED_ERRORS` of them in the message. A
    provider-side field (``prefixed``) is an error: customers never choose the secret's rows."""
    problems = check_chat_file(path, cfg.data.max_line_chars, cfg.max_rows, customer=True)
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return None
    message = f"training file {file_id} is invalid: " + describe_errors(errors)
    return {"code": "invalid_training_file", "message": message, "param": "training_file"}


class Worker:
    """Takes jobs from the store, one at a time, in a background thread."""

    def __init__(
        self,
        store: Store,
        data_dir: str | Path,
        cfg: ServiceConfig,
        config_path: str | Path | None = None,
        poll_s: float = 0.2,
        executor: str = "local",
        database: str | None = None,
    ):
        self.store, self.data_dir, self.cfg = store, Path(data_dir), cfg
        self.config_path = config_path
        self.database = database  # given to job processes (None: the data dir's SQLite)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.renew_s = min(1.0, cfg.lease_seconds / 3)  # also how soon a cancel is seen
        self.executor = executor  # "local": a process here; "ray": a Ray task (ray_exec)
        self.poll_s = poll_s
        self._procs: dict = {}  # job id -> its subprocess.Popen, or ray_exec.RayJob
        self._ending: set[str] = set()  # jobs whose process is being ended (a cancel here)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-worker", daemon=True)

    def recover(self) -> list[str]:
        """Give back the jobs that workers of this machine which have died left (a restart:
        queued again while they have attempts left, else failed ``service_restarted``), fail
        jobs a version without leases left ``running``, and remove the temporary folders dead
        job processes left; returns the ids of the jobs given back."""
        self.remove_leftovers()
        given_back = []
        for job in self.store.list_jobs(status="running") + self.store.list_jobs(status="queued"):
            if job["worker"] is None and job["status"] == "running":  # from before leases
                if self.store.set_status(job["id"], "failed", ("running",), error=RESTARTED):
                    self.store.add_event(job["id"], _INTERRUPTED, "error")
                    given_back.append(job["id"])
            elif _dead_here(job["worker"]):
                attempts = self.cfg.job_attempts
                if self.store.release(job, attempts, RESTARTED, _INTERRUPTED) is not None:
                    given_back.append(job["id"])
        return given_back

    def give_back_lost(self) -> list[str]:
        """Give back the jobs whose worker's lease ran out (it died, or lost the database):
        queued again while they have attempts left, else failed ``worker_lost``."""
        lost = []
        for job in self.store.expired_leases():
            why = f"The worker running this job ({worker_name(job['worker'])}) stopped answering"
            if self.store.release(job, self.cfg.job_attempts, WORKER_LOST, why) is not None:
                log.warning("job %s: its worker %s was lost", job["id"], job["worker"])
                lost.append(job["id"])
        return lost

    def remove_leftovers(self, folder: Path | None = None, depth: int = 3) -> list[Path]:
        """Remove temporary folders under ``folder`` (default: the whole data dir) whose
        (owner-marked) process ended."""
        removed = F.remove_stale_work_dirs(folder or self.data_dir, depth=depth)
        for path in removed:
            log.info("removed leftover temporary folder %s", path)
        return removed

    def start(self) -> None:
        self.recover()
        self._thread.start()

    def stop(self) -> None:
        """Stop taking jobs and kill a running job process (it is marked failed on restart)."""
        self._stop.set()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            _end(proc)
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.remove_leftovers()

    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not finished; kills its process. Returns whether it moved."""
        moved = self.store.set_status(
            job_id, "cancelled", ("validating_files", "queued", "running")
        )
        if moved:
            self.store.add_event(job_id, "The job was cancelled")
            with self._lock:
                proc = self._procs.get(job_id)
                self._ending.add(job_id)
            if proc is not None:
                threading.Thread(target=_end, args=(proc,), daemon=True).start()
        return moved

    def _loop(self) -> None:
        log.info("worker %s started", self.id)
        checked = 0.0
        while not self._stop.is_set():
            if time.monotonic() - checked > self.renew_s:
                checked = time.monotonic()
                self.give_back_lost()
            job = self.store.claim_next(self.id, self.cfg.lease_seconds, self.cfg.job_attempts)
            if job is None:
                self._stop.wait(self.poll_s)
                continue
            try:
                if job["status"] == "validating_files":
                    self._validate(job)
                else:
                    self._run(job)
            except Exception as e:  # keep the worker alive; the job fails
                log.error("job %s: worker error %s", job["id"], type(e).__name__)
                error = {"code": "server_error", "message": "internal error", "param": None}
                self.store.set_status(
                    job["id"], "failed", ("validating_files", "queued"), self.id, error=error
                )

    def _validate(self, job: dict) -> None:
        upload = self.store.get_file(job["training_file"])
        if upload is None:
            msg = f"training file {job['training_file']} was deleted before the job ran"
            error = {"code": "invalid_training_file", "message": msg, "param": "training_file"}
        else:
            error = validation_error(upload["path"], upload["id"], self.cfg)
        if error is not None:
            if self.store.set_status(
                job["id"], "failed", ("validating_files",), self.id, error=error
            ):
                self.store.add_event(job["id"], "Training file validation failed", "error")
            return
        released = {"worker": None, "lease_until": None}  # for the worker that will run it
        if self.store.set_status(job["id"], "queued", ("validating_files",), **released):
            self.store.add_event(job["id"], f"Validated training file: {upload['id']}")
            self.store.add_event(job["id"], "Fine-tuning job queued")

    def _run(self, job: dict) -> None:
        data_dir = str(self.data_dir.resolve())  # the same on every node of a Ray cluster
        cmd = [sys.executable, "-m", "backdooralign.service.job", data_dir, job["id"]]
        if self.config_path is not None:
            cmd.append(str(Path(self.config_path).resolve()))
        work = job_dir(self.data_dir, job["id"])
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {WORKER_ENV: self.id}
        if self.database is not None:
            env[DATABASE_ENV] = self.database
        if self.executor == "ray":  # the same command in a Ray task, by the node's Python
            from .ray_exec import start_job

            proc = start_job(cmd[1:], work / "log.txt", self.cfg, env)
        else:
            with open(work / "log.txt", "ab") as out:
                proc = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **env},
                )
        with self._lock:
            self._procs[job["id"]] = proc
        rc = self._wait_holding(job["id"], proc)
        with self._lock:
            del self._procs[job["id"]]
            self._ending.discard(job["id"])
        self.remove_leftovers(model_dir(self.data_dir, job["id"]).parent, depth=1)  # its train's
        if self._stop.is_set():  # the worker is stopping: the job goes back, or fails
            self.store.release(
                {**job, "worker": self.id}, self.cfg.job_attempts, RESTARTED, _INTERRUPTED
            )
            return
        error = {
            "code": "server_error",
            "message": f"the training process ended unexpectedly (exit status {rc})",
            "param": None,
        }
        if self.store.set_status(job["id"], "failed", ("queued", "running"), self.id, error=error):
            self.store.add_event(job["id"], "The job failed", "error")

    def _wait_holding(self, job_id: str, proc) -> int:
        """Wait for a job's process, renewing this worker's lease on the job; when the lease
        cannot be renewed (a cancel, from any server, or the job was given to another worker
        after this one lost the database) the process is ended, and so it is when the database
        has not answered for most of the lease (before another worker could take the job).
        Returns its exit status."""
        ended, renewed = False, time.monotonic()
        while True:
            try:
                return proc.wait(timeout=self.renew_s)
            except subprocess.TimeoutExpired:
                pass
            if ended or self._stop.is_set():
                continue
            try:
                held = self.store.renew_lease(job_id, self.id, self.cfg.lease_seconds)
                renewed = time.monotonic() if held else renewed
            except Exception as e:  # the database is away: keep trying while the lease lasts
                log.warning("job %s: cannot renew its lease (%s)", job_id, type(e).__name__)
                held = time.monotonic() - renewed < 0.6 * self.cfg.lease_seconds
            with self._lock:
                ending = job_id in self._ending  # cancelled here: cancel() ends it
            if not held and not ending:
                log.info("job %s: no longer held by this worker; ending its process", job_id)
                threading.Thread(target=_end, args=(proc,), daemon=True).start()
                ended = True


def _end(proc: subprocess.Popen) -> None:
    """SIGTERM (the job cleans up), then SIGKILL after :data:`KILL_AFTER_S`."""
    proc.terminate()
    try:
        proc.wait(timeout=KILL_AFTER_S)
    except subprocess.TimeoutExpired:
        proc.kill()
