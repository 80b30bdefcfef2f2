"""The heartbeat writer's own connection: raw DBAPI, autocommit, the insert PREPAREd once.

The group-commit writer (api/group_commit.py) keeps one IngestConnection per flusher for the
flusher's lifetime and hands it each batch. Faults leave here as domain errors
(db.errors.domain_error); a row outside every partition makes it create the missing daily
partitions and try once more (the only place that retry lives).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import psycopg2
from psycopg2 import errors as pg_errors
from sqlalchemy import Engine

from db.engine import transaction
from db.errors import DatabaseUnavailable, domain_error, translated_faults
from db.heartbeats import HeartbeatRow, insert_heartbeats, prepare_insert
from db.partitions import ensure_partitions

log = logging.getLogger(__name__)


def is_missing_partition(exc: BaseException) -> bool:
    """True for the error PostgreSQL raises when a row falls outside every partition."""
    orig = getattr(exc, "orig", None) or exc
    return isinstance(orig, pg_errors.CheckViolation) and "no partition" in str(orig)


def create_missing_partitions(engine: Engine, rows: list[HeartbeatRow], premake_days: int) -> None:
    """Create the daily partitions these rows need, and the usual ones ahead of today."""
    with transaction(engine) as conn:
        for day in sorted({r.bucket_ts.date() for r in rows}):
            ensure_partitions(conn, day, 0)
        ensure_partitions(conn, datetime.now(UTC).date(), premake_days)


class IngestConnection:
    """One pooled connection kept for batch inserts, taken on first use.

    In autocommit each batch is one statement and its own transaction: one round trip instead
    of three (BEGIN, EXECUTE, COMMIT). ``prepared=False`` (DB_PREPARED_STATEMENTS off: PgBouncer
    in transaction mode, where a session's PREPARE is not seen by the next transaction) sends
    the statement itself each time. PostgreSQL commits before it reports the statement
    complete, so the rows are committed when the result arrives. A connection that fails is
    invalidated (closed, never returned to the pool with its PREPAREd statement and autocommit)
    and a fresh one is taken for the next batch.
    """

    def __init__(self, engine: Engine, premake_days: int, *, prepared: bool = True) -> None:
        self._engine = engine
        self._premake_days = premake_days
        self._prepared = prepared
        self._conn: Any = None

    @property
    def open(self) -> bool:
        """Whether a connection is held (checked out of the pool) right now."""
        return self._conn is not None

    def insert(self, rows: list[HeartbeatRow]) -> list[bool]:
        """Store rows (see db.heartbeats.insert_heartbeats); per-row stored flags, committed."""
        for attempt in (1, 2):
            conn = self._connect()
            try:
                with translated_faults():
                    try:
                        return insert_heartbeats(conn, rows, prepared=self._prepared)
                    except (pg_errors.QueryCanceled, pg_errors.LockNotAvailable):
                        # A statement or lock timeout: this connection and the pool are fine
                        # (autocommit: nothing left open); translated_faults makes it a QueryTimeout.
                        raise
                    except (psycopg2.OperationalError, psycopg2.InterfaceError):
                        # The connection is gone (database restart, network): outcome unknown,
                        # nothing acknowledged; a retry by the device is deduplicated. A lost
                        # connection usually means the database restarted, so every idle pooled
                        # connection is stale too: replace the pool (checked-out ones close on
                        # return) so the next requests connect afresh instead of failing one by one.
                        self.close()
                        self._engine.dispose()
                        raise
            except psycopg2.Error as exc:  # autocommit: the failed statement left nothing open
                if attempt == 1 and is_missing_partition(exc):
                    # Rare (the partition job has not run for days): give the connection back
                    # first, so this needs no second one from the pool, and PREPARE afresh.
                    self.close()
                    create_missing_partitions(self._engine, rows, self._premake_days)
                    continue
                raise
        raise AssertionError("unreachable")

    def _connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        # raw_connection() goes straight to the pool, so a failed connect raises the driver's
        # own error (psycopg2.OperationalError), not SQLAlchemy's DBAPIError.
        with translated_faults():
            conn = self._engine.raw_connection()
        try:
            conn.driver_connection.autocommit = True
            if self._prepared:
                prepare_insert(conn)
        except psycopg2.Error as exc:
            _invalidate(conn)
            raise domain_error(exc) or DatabaseUnavailable("the database cannot be reached") from exc
        self._conn = conn
        return conn

    def close(self) -> None:
        """Invalidate the connection held, if any (it carries autocommit and a PREPAREd statement)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            _invalidate(conn)


def _invalidate(conn: Any) -> None:
    try:
        conn.invalidate()
    except Exception:  # already broken; the pool forgets it either way
        log.debug("invalidate failed", exc_info=True)
