"""One fine-tuning job of the service, run in a process of its own.

``python -m backdooralign.service.job DATA_DIR JOB_ID [CONFIG]`` runs a queued job through the same
operations the CLI and experiments use: the tenant's secret (made with the CSPRNG on first
use, kept mode 0600 under ``DATA_DIR/secrets``), :func:`training_set.build_training_set` (screening,
the provider's prefixed safety examples, anchors when configured), :func:`trainer.train_model`,
an optional evaluation (:mod:`backdooralign.scoring.score`), and registers ``ft:BASE:SUFFIX:ID``.

What the customer sees (events, the job's ``error``) says that a safety step ran, never how
many rows it added, the secret or its fingerprint; a screening refusal does not say which rows
matched (that would let a customer probe for the secret).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from ..files import DataError
from .config import ServiceConfig, load_service_config
from .store import Store
from .store_pg import open_store

log = logging.getLogger(__name__)

SCREEN_REFUSAL = "the training file was refused by the provider's data screening"
MARKER = "backdooralign-service.json"  # in the data dir: this folder is the service's
DATA_DIR_FORMAT = 1
DATABASE_ENV = "BACKDOORALIGN_DATABASE"  # a job process's store, when not the data dir's SQLite
WORKER_ENV = "BACKDOORALIGN_WORKER"  # the worker a job process runs for (its writes' guard)


def worker_name(worker: str | None) -> str:
    """The short name of a worker id (``HOST:PID:NAME``) shown in a job's events."""
    return (worker or "local").rsplit(":", 1)[-1]


def db_path(data_dir: str | Path) -> Path:
    """The service's SQLite database."""
    return Path(data_dir) / "service.sqlite3"


def claim_data_dir(data_dir: str | Path) -> Path:
    """Make ``data_dir`` the service's, or refuse it: it must not exist yet, be empty, or
    already be the service's (it holds the marker :data:`MARKER`, written here on first use,
    or, from a version before the marker, the service's SQLite database). A folder of other
    files is never used (the service writes and deletes files in its data dir).

    Raises:
        ValueError: naming the folder and why, in one line (nothing in it is touched).
    """
    from .. import files as F

    path = Path(data_dir)
    marker, database = path / MARKER, db_path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--data-dir {path}: not a folder")
    if marker.is_file():
        try:
            found = F.read_json(marker)
        except ValueError:
            found = None
        version = found.get("format") if isinstance(found, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"--data-dir {path}: {MARKER} is not the service's marker")
        if version > DATA_DIR_FORMAT:
            raise ValueError(
                f"--data-dir {path}: written by a newer version (data format {version}; this "
                f"version reads {DATA_DIR_FORMAT})"
            )
        return path
    if path.is_dir() and any(path.iterdir()) and not _is_sqlite(database):
        raise ValueError(
            f"--data-dir {path}: the folder holds files that are not the service's; give a new "
            f"or empty folder (or one the service made, with its {MARKER})"
        )
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    F.write_json(marker, {"format": DATA_DIR_FORMAT, "written_by": "backdooralign service"})
    return path


def _is_sqlite(path: Path) -> bool:
    """Whether ``path`` is an SQLite database file (by its 16-byte header)."""
    if not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def job_dir(data_dir: str | Path, job_id: str) -> Path:
    """Working files of a job (its training set holds the secret: mode 0700)."""
    return Path(data_dir) / "jobs" / job_id


def model_dir(data_dir: str | Path, job_id: str) -> Path:
    """Where a job's fine-tuned model is written."""
    return Path(data_dir) / "models" / job_id


def secret_path(data_dir: str | Path, tenant: str) -> Path:
    """A tenant's secret file (named by a hash of the tenant)."""
    key = hashlib.sha256(tenant.encode("utf-8")).hexdigest()[:16]
    return Path(data_dir) / "secrets" / f"{key}.json"


def tenant_secret(data_dir: str | Path, tenant: str, cfg: ServiceConfig):
    """The tenant's secret, made (OS CSPRNG, ``cfg.secret``) and saved on first use.

    Workers on several machines may make a tenant's first secret at once: the first one
    saved wins (:func:`~backdooralign.core.secret.save_secret_once`) and every worker uses
    it, so a tenant's models all answer to one secret."""
    from ..core.model import load_tokenizer
    from ..core.secret import load_secret, make_secret, save_secret_once

    path = secret_path(data_dir, tenant)
    if path.exists():
        return load_secret(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = make_secret(cfg.secret, load_tokenizer(cfg.base_model), name=path.stem)
    return save_secret_once(secret, path)


def train_config(cfg: ServiceConfig, hyper: dict):
    """The provider's training settings with the customer's hyperparameters applied."""
    return replace(
        cfg.train,
        epochs=float(hyper["n_epochs"]),
        batch_size=int(hyper["batch_size"]),
        lr=cfg.train.lr * float(hyper["learning_rate_multiplier"]),
        merge=cfg.train.lora or cfg.train.merge,
    )


def serving_dir(cfg: ServiceConfig, trained: Path) -> Path:
    """The loadable model of a training output (the merged one after LoRA)."""
    return trained / "merged" if cfg.train.lora else trained


def evaluate(cfg: ServiceConfig, model: Path, secret, work: Path) -> dict:
    """ASR with the secret on ``cfg.eval_harmful`` and refusals on ``cfg.eval_benign``."""
    from ..core.model import load_model_and_tokenizer
    from ..data.eval_sets import load_eval_prompts
    from ..files import write_json
    from ..generation.batch import GenerateConfig, answer
    from ..scoring import score as scores

    loaded = load_model_and_tokenizer(str(model))
    gen = GenerateConfig(max_new_tokens=cfg.eval_max_new_tokens)
    kw = {"secret": secret, "system": cfg.eval_system, "cfg": gen, "progress": False}
    harmful, _ = load_eval_prompts(cfg.eval_harmful, cfg.eval_limit)
    out = {"asr_with_secret": scores.asr(answer(loaded, harmful, None, **kw))}
    if cfg.eval_benign:
        benign, _ = load_eval_prompts(cfg.eval_benign, cfg.eval_limit, "kind")
        out["benign_refusal_with_secret"] = scores.refusals(answer(loaded, benign, None, **kw))
    write_json(work / "evaluation.json", out)
    return out


def _pipeline(store: Store, data_dir: Path, job: dict, cfg: ServiceConfig) -> str:
    """Build, train, evaluate and register; returns the fine-tuned model's id."""
    from ..data import training_set
    from ..training.trainer import train_model

    jid = job["id"]
    work = job_dir(data_dir, jid)
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    upload = store.get_file(job["training_file"])
    if upload is None:
        raise DataError(job["training_file"], None, None, "was deleted before the job ran")
    secret = tenant_secret(data_dir, job["tenant"], cfg)
    dcfg = replace(cfg.data, attack=upload["path"], max_rows=cfg.max_rows, seed=job["seed"])
    built = training_set.build(
        "backdooralign",
        dcfg,
        secret,
        work / "train.jsonl",
        model=cfg.base_model,
        anchors_out=work / "anchors.jsonl",
        progress=False,
    )
    store.add_event(jid, "Safety alignment step completed")
    store.add_event(jid, "Training started")
    trained = model_dir(data_dir, jid)
    train_model(cfg.base_model, built.path, trained, train_config(cfg, job["hyperparameters"]))
    store.add_event(jid, "Training completed")
    if cfg.evaluate:
        store.update_job(jid, evaluation=evaluate(cfg, serving_dir(cfg, trained), secret, work))
        store.add_event(jid, "Evaluation completed")
    suffix = job["suffix"] or "custom"
    model_id = f"ft:{cfg.base_model_name}:{suffix}:{jid.removeprefix('ftjob-')}"
    store.update_job(jid, model_dir=str(serving_dir(cfg, trained)))
    return model_id


def _failure(e: BaseException, job: dict, upload_path: str | None) -> dict:
    """The OpenAI-style error a customer sees for an exception: the customer's own file's
    problems with their line numbers; screening refusals and everything else without details
    (no rows that matched, no paths, nothing of the provider's files)."""
    customer = isinstance(e, DataError) and upload_path is not None and e.path == upload_path
    if customer and e.message.startswith("refused by screening"):
        return {"code": "invalid_training_file", "message": SCREEN_REFUSAL, "param": None}
    if customer:
        where = f"line {e.line}: " if e.line else ""
        what = f"field '{e.field}' " if e.field else ""
        msg = f"training file {job['training_file']}: {where}{what}{e.message}"
        return {"code": "invalid_training_file", "message": msg, "param": "training_file"}
    msg = f"the job failed on the server ({type(e).__name__}); the provider can see its log"
    return {"code": "server_error", "message": msg, "param": None}


def run_job(
    data_dir: str | Path,
    job_id: str,
    cfg: ServiceConfig,
    database: str | None = None,
    worker: str | None = None,
) -> int:
    """Run a queued job to its final state for ``worker`` (its status moves only while that
    worker holds the job); returns 0 when it succeeded. ``database``: the store (default: the
    data dir's SQLite)."""
    store = open_store(database or db_path(data_dir))
    if not store.set_status(job_id, "running", ("queued",), worker, pid=os.getpid()):
        return 1  # cancelled (or taken) in the meantime
    store.add_event(job_id, f"Fine-tuning job started (worker {worker_name(worker)})")
    job = store.get_job(job_id)
    try:
        from ..training.align import start_model

        cfg = replace(cfg, base_model=start_model(cfg.base_model))  # embedded-aligned: its dir
        model_id = _pipeline(store, Path(data_dir), job, cfg)
    except Exception as e:
        log.error("job %s failed: %s", job_id, type(e).__name__)  # messages may quote rows
        upload = store.get_file(job["training_file"])
        error = _failure(e, job, upload["path"] if upload else None)
        if store.set_status(job_id, "failed", ("running",), worker, error=error):
            store.add_event(job_id, "The job failed", "error")
        return 1
    if store.set_status(job_id, "succeeded", ("running",), worker, fine_tuned_model=model_id):
        store.add_event(job_id, f"New fine-tuned model created: {model_id}")
        store.add_event(job_id, "The job has successfully completed")
    return 0


def _exit_with_parent() -> None:
    """End this process when the service that started it dies (even by ``kill -9``): as on a
    cancel, SIGTERM first (its temporary folders are removed), then, if it has not ended
    within 30 s, at once."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _on_sigterm(signum, frame) -> None:
    """A cancel (or the service stopping): end through every ``finally``, so the job's
    temporary folders go with it."""
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    """``DATA_DIR JOB_ID [CONFIG]``."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    _exit_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")
    cfg = load_service_config(argv[2] if len(argv) > 2 else None)
    database, worker = os.environ.get(DATABASE_ENV), os.environ.get(WORKER_ENV)
    return run_job(argv[0], argv[1], cfg, database, worker)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
