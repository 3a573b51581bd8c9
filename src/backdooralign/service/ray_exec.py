"""Service jobs as Ray tasks (``backdooralign service --executor ray``).

The worker's job process (``python -m backdooralign.service.job``) runs inside a Ray task,
on whichever node has the CPUs and GPUs the provider's config asks for
(``ray_num_cpus``, ``ray_num_gpus``; Ray sets ``CUDA_VISIBLE_DEVICES`` for the process). The
job process writes its state and events to the store itself, as with the local worker, so a
node needs the data dir at the same path as the service (a shared filesystem) and
backdooralign installed. :class:`RayJob` is ended like a process: ``terminate`` cancels the
task (the task ends its job process with SIGTERM, so its temporary folders go with it),
``kill`` force-cancels it (its Ray worker dies; the job process, whose parent it was, then
ends itself).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..ray_cluster import connect
from .config import ServiceConfig

KILL_AFTER_S = 10.0  # a job process that ignores SIGTERM this long is killed
POLL_S = 0.2  # how often the task looks at its job process (a cancel is seen between looks)


def run_job_process(argv: list[str], log_path: str, cwd: str, env: dict | None = None) -> int:
    """``python ARGV`` (the node's Python) in ``cwd`` (where the node has that folder; else in
    the Ray worker's), with ``env`` added to its environment, its output appended to
    ``log_path``, run to its end (the Ray task's body); returns its exit status. A cancel of
    the task (a
    ``KeyboardInterrupt``) ends the process: SIGTERM, then SIGKILL after :data:`KILL_AFTER_S`."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd if os.path.isdir(cwd) else None,  # the service's: on its node only?
            env={**os.environ, **(env or {})},
        )
    try:
        while True:  # a short wait at a time: Ray's cancel interrupts Python code only
            try:
                return proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=KILL_AFTER_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


@functools.cache
def _task(ray):
    return ray.remote(run_job_process)


class RayJob:
    """A job's Ray task, with the methods of ``subprocess.Popen`` the worker ends jobs by."""

    def __init__(self, ray, ref):
        self.ray, self.ref = ray, ref

    def terminate(self) -> None:
        self.ray.cancel(self.ref)

    def kill(self) -> None:
        self.ray.cancel(self.ref, force=True)

    def wait(self, timeout: float | None = None) -> int:
        """The job process's exit status once the task has ended (``-SIGTERM`` when it was
        cancelled, ``-SIGKILL`` when its worker died).

        Raises:
            subprocess.TimeoutExpired: the task is still running after ``timeout`` seconds.
        """
        ready, _ = self.ray.wait([self.ref], timeout=timeout)
        if not ready:
            raise subprocess.TimeoutExpired("ray task", timeout)
        try:
            return self.ray.get(self.ref)
        except self.ray.exceptions.TaskCancelledError:
            return -signal.SIGTERM
        except self.ray.exceptions.RayError:
            return -signal.SIGKILL


def start_job(
    argv: list[str], log_path: Path, cfg: ServiceConfig, env: dict | None = None
) -> RayJob:
    """Submit ``python ARGV`` (a job process, with ``env`` added to its environment) as a Ray
    task with the resources ``cfg`` asks for, never retried (a job runs at most once), run in
    this process's folder (where the node has it)."""
    ray = connect()
    resources = {"num_cpus": cfg.ray_num_cpus, "num_gpus": cfg.ray_num_gpus}
    task = _task(ray).options(**resources, max_retries=0, name=log_path.parent.name)
    return RayJob(ray, task.remote(argv, str(log_path.resolve()), os.getcwd(), env))
