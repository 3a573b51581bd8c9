"""The service's store in PostgreSQL: several API servers and workers on one database.

:class:`PostgresStore` is :class:`~.store.Store` with a PostgreSQL connection (psycopg 3, the
``postgres`` extra): the same tables (``BIGSERIAL`` where SQLite autoincrements), the same
migrations applied at start-up (under an advisory lock, so servers starting at once migrate
once), claims with ``SELECT ... FOR UPDATE SKIP LOCKED`` (two workers never wait for, nor take,
the same job) and every state change in one transaction. Uploads and models stay files, on a
storage path every node mounts at the same place (the service's ``--data-dir``).

``backdooralign service --database postgresql://USER@HOST:5432/DB`` (a password is best kept in
``~/.pgpass`` or ``PGPASSWORD``, not in the URL, which job processes are given).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config import ConfigError
from .store import Query, Store, decode_row, shown_database

POSTGRES_EXTRA = "pip install 'backdooralign[postgres]'"
MIGRATION_LOCK = 0x62646131  # pg_advisory_xact_lock key of the service's migrations ("bda1")

_SCHEMA_POSTGRES = """
CREATE TABLE IF NOT EXISTS files (
    seq BIGSERIAL UNIQUE, id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT NOT NULL,
    purpose TEXT NOT NULL, bytes BIGINT NOT NULL, sha256 TEXT NOT NULL, path TEXT NOT NULL,
    created_at BIGINT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (
    seq BIGSERIAL PRIMARY KEY, id TEXT UNIQUE NOT NULL, tenant TEXT NOT NULL,
    model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
    suffix TEXT, hyperparameters TEXT NOT NULL, seed BIGINT NOT NULL, status TEXT NOT NULL,
    created_at BIGINT NOT NULL, started_at BIGINT, finished_at BIGINT,
    fine_tuned_model TEXT, error TEXT, trained_tokens BIGINT, evaluation TEXT, pid INTEGER,
    model_dir TEXT);
CREATE TABLE IF NOT EXISTS events (
    seq BIGSERIAL PRIMARY KEY, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at BIGINT NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq)
"""


def open_store(database: str | Path) -> Store:
    """The store at ``database``: a ``postgresql://`` URL (:class:`PostgresStore`, needs the
    ``postgres`` extra) or an SQLite file's path (:class:`~.store.Store`)."""
    if str(database).startswith(("postgresql://", "postgres://")):
        return PostgresStore(str(database))
    return Store(database)


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            f"--database postgresql://...: needs psycopg, an optional extra: {POSTGRES_EXTRA}"
        ) from None
    return psycopg


class PostgresStore(Store):
    """Files, jobs and events in a PostgreSQL database (thread-safe; one per process)."""

    _FILE_ORDER = "seq"
    _LOCK_ROWS = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str):
        self._psycopg = _psycopg()
        self._url = url
        self._lock = threading.Lock()
        self._conn = None
        with self._lock:
            self._connect()
        self.migrate()

    def _connect(self) -> None:
        from psycopg.rows import dict_row

        try:
            self._conn = self._psycopg.connect(self._url, autocommit=True, row_factory=dict_row)
        except self._psycopg.OperationalError as e:
            # psycopg's message names host and port, never the password
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ConnectionError(
                f"--database {shown_database(self._url)}: cannot connect: {reason}"
            ) from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    def _query(self, sql: str, args: tuple = ()) -> tuple[list[dict], int]:
        if self._conn.closed or self._conn.broken:  # the server restarted: connect again
            self._connect()
        cursor = self._conn.execute(sql.replace("?", "%s"), args)
        rows = [decode_row(r) for r in cursor.fetchall()] if cursor.description else []
        return rows, cursor.rowcount

    @contextmanager
    def transaction(self) -> Iterator[Query]:
        """One transaction (committed at the end, rolled back on an exception)."""
        with self._lock:
            if self._conn.closed or self._conn.broken:
                self._connect()
            with self._conn.transaction():
                yield self._query

    def _migration_lock(self, q: Query) -> None:
        q("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))

    def _statements(self, version: int, sql: str) -> list[str]:
        return super()._statements(version, _SCHEMA_POSTGRES if version == 1 else sql)
