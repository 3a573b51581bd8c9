"""Durable state of the fine-tuning service: files, jobs and job events.

:class:`Store` is the whole interface the service, its workers and the job processes use: plain
methods that take and return plain dicts. It keeps them in SQLite (WAL mode; the embedded
default, one machine); :class:`~.store_pg.PostgresStore` keeps the same tables in PostgreSQL for
several API servers and workers on several machines (:func:`~.store_pg.open_store` picks one
from ``--database``). Every state change is one short transaction, and a job's status only moves
forward through :meth:`Store.set_status`, whose ``only_from`` guard keeps a late writer (a job
process finishing after a cancel) from undoing a final state.

Workers claim jobs with a **lease** (:meth:`Store.claim_next`, ``FOR UPDATE SKIP LOCKED`` in
PostgreSQL): the job's ``worker`` column names the worker and ``lease_until`` says until when
it holds the job; the worker renews it while the job runs (:meth:`Store.renew_lease`, which
also tells it that a cancel arrived, from whichever API server). A job whose lease ran out
(its worker died, even by ``kill -9``) is given back by :meth:`Store.release`: queued again
while it has attempts left (``job_attempts``), else failed; the job process's own writes are
guarded by its worker (``held_by``), so a job never runs twice at the same time.

The schema is versioned: :data:`MIGRATIONS` are applied in order at start-up, each once,
recorded in ``schema_migrations``.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

JOB_STATES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")
HELD_STATES = ("queued", "running")  # a worker's lease on the job matters in these

_SCHEMA_SQLITE = """
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
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq)
"""

_LEASES = """
ALTER TABLE jobs ADD COLUMN worker TEXT;
ALTER TABLE jobs ADD COLUMN lease_until DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_status ON jobs (status, seq)
"""

# (version, what it does, its statements); version 1 is the schema of the first release, which
# SQLite databases made before migrations existed already have (CREATE ... IF NOT EXISTS).
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "files, jobs and events", _SCHEMA_SQLITE),
    (2, "job leases: worker, lease_until, attempts", _LEASES),
)

_JSON_COLUMNS = ("hyperparameters", "error", "evaluation")
_INSERT_EVENT = "INSERT INTO events (id, job_id, created_at, level, message) VALUES (?, ?, ?, ?, ?)"

Query = Callable[..., tuple[list[dict], int]]  # (sql, args) -> (rows, rowcount)


def new_id(prefix: str) -> str:
    """A random identifier such as ``file-3f9a...`` (24 hex digits)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def decode_row(row: dict) -> dict:
    """A row with its JSON columns parsed."""
    for key in _JSON_COLUMNS:
        if row.get(key) is not None:
            row[key] = json.loads(row[key])
    return row


def _row(cursor: sqlite3.Cursor, values: tuple) -> dict:
    return decode_row({d[0]: v for d, v in zip(cursor.description, values, strict=True)})


def shown_database(database: str | Path) -> str:
    """``database`` as it may be printed: a URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    text = str(database)
    if "://" not in text:
        return text
    parts = urlsplit(text)
    if parts.password is None:
        return text
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Store:
    """Files, jobs and events in one SQLite database (thread-safe; one per process)."""

    _FILE_ORDER = "rowid"  # files in upload order, for equal created_at
    _LOCK_ROWS = ""  # PostgreSQL: FOR UPDATE SKIP LOCKED

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        self._db.isolation_level = None  # autocommit; transactions are explicit
        self._db.row_factory = _row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        self.migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- the database: a query, a transaction; what PostgresStore replaces ----------------

    def _query(self, sql: str, args: tuple = ()) -> tuple[list[dict], int]:
        cursor = self._db.execute(sql, args)
        return (cursor.fetchall() if cursor.description else []), cursor.rowcount

    @contextmanager
    def transaction(self) -> Iterator[Query]:
        """One transaction (SQLite: ``BEGIN IMMEDIATE``, so it holds the write lock from its
        first statement); yields the query function, ``q(sql, args) -> (rows, rowcount)``."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._query
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _migration_lock(self, q: Query) -> None:
        """Serialise start-ups that migrate at once (SQLite: the write lock already does)."""

    def _statements(self, version: int, sql: str) -> list[str]:
        return [s.strip() for s in sql.split(";") if s.strip()]

    def migrate(self) -> list[int]:
        """Apply the :data:`MIGRATIONS` this database has not had, in order, each in one
        transaction with its record; returns the versions applied."""
        applied = []
        for version, what, sql in MIGRATIONS:
            with self.transaction() as q:
                self._migration_lock(q)
                q(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                    "description TEXT NOT NULL, applied_at INTEGER NOT NULL)"
                )
                done, _ = q("SELECT version FROM schema_migrations WHERE version = ?", (version,))
                if done:
                    continue
                for statement in self._statements(version, sql):
                    q(statement)
                q(
                    "INSERT INTO schema_migrations (version, description, applied_at) "
                    "VALUES (?, ?, ?)",
                    (version, what, int(time.time())),
                )
                applied.append(version)
        return applied

    def schema_version(self) -> int:
        """The newest migration applied."""
        return self._one("SELECT MAX(version) AS v FROM schema_migrations")["v"]

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return self._query(sql, args)[0]

    def _one(self, sql: str, args: tuple = ()) -> dict | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._query(sql, args)[1]

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
            f"{self._FILE_ORDER} DESC",
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
        with self.transaction() as q:  # the job and its first event: a worker may start at once
            q(
                "INSERT INTO jobs (id, tenant, model, training_file, validation_file, "
                "suffix, hyperparameters, seed, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            q(_INSERT_EVENT, event)
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
        self,
        job_id: str,
        status: str,
        only_from: tuple[str, ...] = (),
        held_by: str | None = None,
        **fields,
    ) -> bool:
        """Move a job to ``status`` (only from one of ``only_from`` when given; only while the
        worker ``held_by`` holds it, when given) and set other columns (``error``,
        ``fine_tuned_model``, ``pid``...); returns whether it moved."""
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
        if held_by is not None:
            sql, args = sql + " AND worker = ?", [*args, held_by]
        return self._write(sql, tuple(args)) == 1

    def update_job(self, job_id: str, **fields) -> None:
        """Set columns of a job without changing its status (e.g. ``evaluation``)."""
        values = {k: json.dumps(v) if k in _JSON_COLUMNS else v for k, v in fields.items()}
        cols = ", ".join(f"{k} = ?" for k in values)
        self._write(f"UPDATE jobs SET {cols} WHERE id = ?", (*values.values(), job_id))

    def claim_next(
        self, worker: str = "local", lease_s: float = 60.0, attempts: int = 1
    ) -> dict | None:
        """Claim the oldest job waiting for a worker, validation first, then the queue: it is
        leased to ``worker`` for ``lease_s`` seconds (a queued one counts an attempt; one with
        ``attempts`` used is not taken). Claims by several workers at once never take the same
        job (SQLite: the write lock; PostgreSQL: ``FOR UPDATE SKIP LOCKED``)."""
        now = time.time()
        with self.transaction() as q:
            rows, _ = q(
                "SELECT * FROM jobs WHERE (status = 'validating_files' OR (status = 'queued' "
                "AND attempts < ?)) AND (worker IS NULL OR lease_until < ?) "
                "ORDER BY status = 'queued', seq LIMIT 1" + self._LOCK_ROWS,
                (attempts, now),
            )
            if not rows:
                return None
            job = rows[0]
            job["attempts"] += job["status"] == "queued"
            job["worker"], job["lease_until"] = worker, now + lease_s
            q(
                "UPDATE jobs SET worker = ?, lease_until = ?, attempts = ? WHERE id = ?",
                (worker, job["lease_until"], job["attempts"], job["id"]),
            )
        return job

    def renew_lease(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Extend ``worker``'s lease on a job it runs; ``False`` when it no longer holds it
        (the job was cancelled, or its lease ran out and it was given to another worker):
        the worker then ends the job's process."""
        return (
            self._write(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND worker = ? "
                "AND status IN ('queued', 'running')",
                (time.time() + lease_s, job_id, worker),
            )
            == 1
        )

    def expired_leases(self) -> list[dict]:
        """Queued or running jobs whose worker's lease ran out."""
        return self._all(
            "SELECT * FROM jobs WHERE status IN ('queued', 'running') AND worker IS NOT NULL "
            "AND lease_until < ? ORDER BY seq",
            (time.time(),),
        )

    def release(self, job: dict, attempts: int, error: dict, why: str) -> str | None:
        """Give back a job its worker lost (``job`` as read, with that worker): queued again
        when it has used fewer than ``attempts`` attempts, else failed with ``error``; an
        event says ``why``. One transaction; nothing happens (``None``) when the job moved
        or another worker took it meanwhile. Returns the new status."""
        with self.transaction() as q:
            rows, _ = q(
                "SELECT status, worker, attempts FROM jobs WHERE id = ?" + self._LOCK_ROWS,
                (job["id"],),
            )
            now = rows[0] if rows else None
            if now is None or now["status"] not in HELD_STATES or now["worker"] != job["worker"]:
                return None
            if now["attempts"] < attempts:
                q(
                    "UPDATE jobs SET status = 'queued', worker = NULL, lease_until = NULL, "
                    "pid = NULL WHERE id = ?",
                    (job["id"],),
                )
                message, level, status = f"{why}; the job is queued again", "warn", "queued"
            else:
                q(
                    "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
                    (json.dumps(error), int(time.time()), job["id"]),
                )
                message, level, status = why, "error", "failed"
            q(_INSERT_EVENT, (new_id("ftevent"), job["id"], int(time.time()), level, message))
        return status

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
