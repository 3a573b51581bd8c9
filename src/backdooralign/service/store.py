"""Durable state of the fine-tuning service: files, jobs and job events in SQLite (WAL mode).

:class:`Store` is the whole interface the service, its worker and the job processes use: plain
methods that take and return plain dicts. Several processes may open the same database (WAL
lets readers and one writer work at once); every state change is one short transaction, and a
job's status only moves forward through :meth:`Store.set_status`, whose ``only_from`` guard
keeps a late writer (a job process finishing after a cancel) from undoing a final state.

Replacing SQLite (PostgreSQL for several workers) means reimplementing these methods; the
claim of the next job (:meth:`Store.claim_next`) becomes ``SELECT ... FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path

JOB_STATES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, path TEXT NOT NULL,
    created_at INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, tenant TEXT NOT NULL,
    model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
    suffix TEXT, hyperparameters TEXT NOT NULL, seed INTEGER NOT NULL, status TEXT NOT NULL,
    created_at INTEGER NOT NULL, started_at INTEGER, finished_at INTEGER,
    fine_tuned_model TEXT, error TEXT, trained_tokens INTEGER, evaluation TEXT, pid INTEGER,
    model_dir TEXT);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
"""

_JSON_COLUMNS = ("hyperparameters", "error", "evaluation")
_INSERT_EVENT = "INSERT INTO events (id, job_id, created_at, level, message) VALUES (?, ?, ?, ?, ?)"


def new_id(prefix: str) -> str:
    """A random identifier such as ``file-3f9a...`` (24 hex digits)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def _row(cursor: sqlite3.Cursor, values: tuple) -> dict:
    row = {d[0]: v for d, v in zip(cursor.description, values, strict=True)}
    for key in _JSON_COLUMNS:
        if row.get(key) is not None:
            row[key] = json.loads(row[key])
    return row


class Store:
    """Files, jobs and events in one SQLite database (thread-safe; one per process)."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        self._db.isolation_level = None  # autocommit; transactions are explicit
        self._db.row_factory = _row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _one(self, sql: str, args: tuple = ()) -> dict | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # -- files ----------------------------------------------------------------------------

    def add_file(self, tenant: str, filename: str, purpose: str, size: int, sha: str, path: str):
        """Record an uploaded file (its bytes are already on disk); returns its row."""
        fid = new_id("file")
        self._write(
            "INSERT INTO files (id, tenant, filename, purpose, bytes, sha256, path, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (fid, tenant, filename, purpose, size, sha, path, int(time.time())),
        )
        return self.get_file(fid)

    def get_file(self, file_id: str, tenant: str | None = None) -> dict | None:
        """The file's row (``None`` when unknown, deleted, or another tenant's)."""
        row = self._one("SELECT * FROM files WHERE id = ? AND deleted = 0", (file_id,))
        return row if row and (tenant is None or row["tenant"] == tenant) else None

    def list_files(self, tenant: str, purpose: str | None = None) -> list[dict]:
        """A tenant's files, newest first."""
        rows = self._all(
            "SELECT * FROM files WHERE tenant = ? AND deleted = 0 ORDER BY created_at DESC, "
            "rowid DESC",
            (tenant,),
        )
        return [r for r in rows if purpose is None or r["purpose"] == purpose]

    def delete_file(self, file_id: str) -> None:
        """Mark a file deleted (the row stays, for the jobs that name it)."""
        self._write("UPDATE files SET deleted = 1 WHERE id = ?", (file_id,))

    # -- jobs -----------------------------------------------------------------------------

    def add_job(self, tenant: str, model: str, training_file: str, **fields) -> dict:
        """A new job in ``validating_files``; ``fields``: ``suffix``, ``hyperparameters``,
        ``seed``, ``validation_file``."""
        jid, now = new_id("ftjob"), int(time.time())
        row = (
            jid,
            tenant,
            model,
            training_file,
            fields.get("validation_file"),
            fields.get("suffix"),
            json.dumps(fields.get("hyperparameters", {})),
            fields.get("seed", 0),
            "validating_files",
            now,
        )
        event = (new_id("ftevent"), jid, now, "info", f"Created fine-tuning job: {jid}")
        with self._lock:  # the job and its first event together: the worker may start at once
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO jobs (id, tenant, model, training_file, validation_file, "
                    "suffix, hyperparameters, seed, status, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                self._db.execute(_INSERT_EVENT, event)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get_job(jid)

    def get_job(self, job_id: str, tenant: str | None = None) -> dict | None:
        """The job's row (``None`` when unknown or another tenant's)."""
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return row if row and (tenant is None or row["tenant"] == tenant) else None

    def list_jobs(self, tenant: str | None = None, status: str | None = None) -> list[dict]:
        """Jobs (of a tenant, in a status), newest first."""
        sql, args = "SELECT * FROM jobs WHERE 1 = 1", []
        if tenant is not None:
            sql, args = sql + " AND tenant = ?", [*args, tenant]
        if status is not None:
            sql, args = sql + " AND status = ?", [*args, status]
        return self._all(sql + " ORDER BY seq DESC", tuple(args))

    def find_model(self, model_id: str, tenant: str) -> dict | None:
        """The succeeded job of a tenant that registered ``model_id``."""
        return self._one(
            "SELECT * FROM jobs WHERE fine_tuned_model = ? AND tenant = ? AND status = ?",
            (model_id, tenant, "succeeded"),
        )

    def set_status(
        self, job_id: str, status: str, only_from: tuple[str, ...] = (), **fields
    ) -> bool:
        """Move a job to ``status`` (only from one of ``only_from`` when given) and set other
        columns (``error``, ``fine_tuned_model``, ``pid``...); returns whether it moved."""
        if status not in JOB_STATES:
            raise ValueError(f"unknown job status {status!r}")
        now = int(time.time())
        if status == "running":
            fields.setdefault("started_at", now)
        if status in FINAL_STATES:
            fields.setdefault("finished_at", now)
        values = {
            k: json.dumps(v) if k in _JSON_COLUMNS and v is not None else v
            for k, v in fields.items()
        }
        cols = ", ".join(f"{k} = ?" for k in ["status", *values])
        sql = f"UPDATE jobs SET {cols} WHERE id = ?"
        args = [status, *values.values(), job_id]
        if only_from:
            sql += f" AND status IN ({', '.join('?' * len(only_from))})"
            args += list(only_from)
        return self._write(sql, tuple(args)) == 1

    def update_job(self, job_id: str, **fields) -> None:
        """Set columns of a job without changing its status (e.g. ``evaluation``)."""
        values = {k: json.dumps(v) if k in _JSON_COLUMNS else v for k, v in fields.items()}
        cols = ", ".join(f"{k} = ?" for k in values)
        self._write(f"UPDATE jobs SET {cols} WHERE id = ?", (*values.values(), job_id))

    def claim_next(self) -> dict | None:
        """The oldest job waiting for the worker: validation first, then the queue.

        The worker validates ``validating_files`` jobs itself and runs ``queued`` ones; with a
        single worker no two claims race (PostgreSQL: ``FOR UPDATE SKIP LOCKED``).
        """
        return self._one(
            "SELECT * FROM jobs WHERE status IN ('validating_files', 'queued') "
            "ORDER BY status = 'queued', seq LIMIT 1"
        )

    # -- events ---------------------------------------------------------------------------

    def add_event(self, job_id: str, message: str, level: str = "info") -> None:
        """Append an event to a job (what the customer sees: never secrets or counts)."""
        self._write(_INSERT_EVENT, (new_id("ftevent"), job_id, int(time.time()), level, message))

    def list_events(self, job_id: str) -> list[dict]:
        """A job's events, newest first."""
        return self._all(
            "SELECT id, created_at, level, message FROM events WHERE job_id = ? ORDER BY seq DESC",
            (job_id,),
        )
