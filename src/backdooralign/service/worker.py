"""The service's job worker: validates new jobs, runs queued ones one at a time.

A thread of the service process takes the oldest waiting job from the :class:`Store`. Jobs in
``validating_files`` are checked here (``chat_files.check_chat_file``: every error with its line
number, as the job's OpenAI-style error); queued jobs run in a process of their own
(``python -m backdooralign.service.job``), so the API keeps answering while a model trains, and a
cancel ends that process (SIGTERM, so its temporary folders go with it; SIGKILL if it has not
ended within :data:`KILL_AFTER_S`). A job process ends itself when the service dies, and
:meth:`Worker.recover` marks the jobs a dead service left ``running`` as failed and removes the
temporary folders dead processes left in the data dir (those with our owner marker only).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from .. import files as F
from ..data.chat_files import check_chat_file
from ..data.formats import Problem
from .config import ServiceConfig
from .job import job_dir, model_dir
from .store import Store

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 10
KILL_AFTER_S = 10.0  # a job process that ignores SIGTERM this long is killed
RESTARTED = {
    "code": "service_restarted",
    "message": "the service stopped while this job was running; create the job again",
    "param": None,
}


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
    ):
        self.store, self.data_dir, self.cfg = store, Path(data_dir), cfg
        self.config_path = config_path
        self.executor = executor  # "local": a process here; "ray": a Ray task (ray_exec)
        self.poll_s = poll_s
        self._procs: dict = {}  # job id -> its subprocess.Popen, or ray_exec.RayJob
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-worker", daemon=True)

    def recover(self) -> list[str]:
        """Mark jobs left ``running`` by a service that died as failed, and remove the
        temporary folders dead job processes left; returns the failed jobs' ids."""
        self.remove_leftovers()
        failed = []
        for job in self.store.list_jobs(status="running"):
            if self.store.set_status(job["id"], "failed", ("running",), error=RESTARTED):
                self.store.add_event(job["id"], "The job was interrupted by a restart", "error")
                failed.append(job["id"])
        return failed

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
            if proc is not None:
                threading.Thread(target=_end, args=(proc,), daemon=True).start()
        return moved

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim_next()
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
                    job["id"], "failed", ("validating_files", "queued"), error=error
                )

    def _validate(self, job: dict) -> None:
        upload = self.store.get_file(job["training_file"])
        if upload is None:
            msg = f"training file {job['training_file']} was deleted before the job ran"
            error = {"code": "invalid_training_file", "message": msg, "param": "training_file"}
        else:
            error = validation_error(upload["path"], upload["id"], self.cfg)
        if error is not None:
            if self.store.set_status(job["id"], "failed", ("validating_files",), error=error):
                self.store.add_event(job["id"], "Training file validation failed", "error")
            return
        if self.store.set_status(job["id"], "queued", ("validating_files",)):
            self.store.add_event(job["id"], f"Validated training file: {upload['id']}")
            self.store.add_event(job["id"], "Fine-tuning job queued")

    def _run(self, job: dict) -> None:
        data_dir = str(self.data_dir.resolve())  # the same on every node of a Ray cluster
        cmd = [sys.executable, "-m", "backdooralign.service.job", data_dir, job["id"]]
        if self.config_path is not None:
            cmd.append(str(Path(self.config_path).resolve()))
        work = job_dir(self.data_dir, job["id"])
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.executor == "ray":  # the same command in a Ray task, by the node's Python
            from .ray_exec import start_job

            proc = start_job(cmd[1:], work / "log.txt", self.cfg)
        else:
            with open(work / "log.txt", "ab") as out:
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
        with self._lock:
            self._procs[job["id"]] = proc
        rc = proc.wait()
        with self._lock:
            del self._procs[job["id"]]
        self.remove_leftovers(model_dir(self.data_dir, job["id"]).parent, depth=1)  # its train's
        if self._stop.is_set():
            return  # the service is stopping: a restart marks the job failed
        error = {
            "code": "server_error",
            "message": f"the training process ended unexpectedly (exit status {rc})",
            "param": None,
        }
        if self.store.set_status(job["id"], "failed", ("queued", "running"), error=error):
            self.store.add_event(job["id"], "The job failed", "error")


def _end(proc: subprocess.Popen) -> None:
    """SIGTERM (the job cleans up), then SIGKILL after :data:`KILL_AFTER_S`."""
    proc.terminate()
    try:
        proc.wait(timeout=KILL_AFTER_S)
    except subprocess.TimeoutExpired:
        proc.kill()
