"""The heartbeat hot path: decode and validate, choose the dedup bucket, write.

Two writers share one contract, ``write(row) -> stored``, answered only after COMMIT:
- DirectWriter: one transaction per heartbeat (plain threads, the Flask test client);
- GroupCommitWriter: under gevent, a flusher greenlet per worker drains a bounded queue of
  concurrent heartbeats into one multi-row statement (its own transaction, in autocommit), then
  wakes every waiting request; under moderate load it lingers a few milliseconds for a bigger
  batch. Under overload it sheds (503 + Retry-After) instead of letting latency grow without
  bound, before any work: a growing fraction of requests while the worker's event loop runs
  INGEST_MAX_LOOP_LAG_MS late (CPU saturated), all of them while heartbeats have waited
  INGEST_MAX_QUEUE_DELAY_MS to be written (database slow), and when the queue is full.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import gevent
import msgspec
import psycopg2
from gevent.event import AsyncResult
from gevent.queue import Empty, Full, Queue
from gevent.timeout import Timeout
from psycopg2 import errors as pg_errors
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api.body import decode_json
from api.concurrency import gevent_active
from api.errors import ApiError
from api.schemas import HeartbeatIn
from api.shedding import CoDelShedder
from config.settings import Settings
from db.errors import DatabaseUnavailable, Overloaded
from db.heartbeats import HeartbeatRow, insert_heartbeats, prepare_insert
from db.partitions import ensure_partitions

log = logging.getLogger(__name__)

_KNOWN_FIELDS = frozenset(HeartbeatIn.__struct_fields__)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


MAX_EXTRA_DEPTH = 8


def _nesting_depth(value: Any) -> int:
    """How deeply lists and objects nest in a decoded JSON value (a scalar is 0, {} is 1)."""
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            return depth
        depth += 1
        level = [child for v in containers for child in (v.values() if isinstance(v, dict) else v)]


def floor_to_bucket(ts: datetime, bucket_s: int) -> datetime:
    """``ts`` floored to a multiple of ``bucket_s`` seconds since the epoch (UTC)."""
    seconds = int((ts - _EPOCH).total_seconds() // bucket_s) * bucket_s
    return _EPOCH + timedelta(seconds=seconds)


def choose_bucket(sent_at: datetime, now: datetime, bucket_s: int, max_skew_s: int) -> tuple[datetime, float, bool]:
    """(bucket, skew in seconds, corrected?). The device clock decides the bucket, so a retry of
    the same body lands in the same bucket.

    A clock more than ``max_skew_s`` off the server's is corrected by its skew rounded to whole
    hours (a wrong time zone, or a clock years off): the bucket stays within half an hour of
    the server's time (so inside an existing partition) and still follows the body's
    ``sent_at``, so a retry seconds later maps to the same bucket unless the skew sits within
    seconds of a half-hour mark. Using the server's arrival time instead would split retries
    that straddle a bucket boundary into two stored rows.
    """
    skew_s = (now - sent_at).total_seconds()
    if abs(skew_s) <= max_skew_s:
        return floor_to_bucket(sent_at, bucket_s), skew_s, False
    correction = timedelta(hours=round(skew_s / 3600))
    return floor_to_bucket(sent_at + correction, bucket_s), skew_s, True


def _integer_fields(struct: type) -> frozenset[str]:
    """The fields of a msgspec Struct that hold integers (optional ones included)."""
    names = set()
    for f in msgspec.inspect.type_info(struct).fields:
        kinds = f.type.types if isinstance(f.type, msgspec.inspect.UnionType) else (f.type,)
        if any(isinstance(k, msgspec.inspect.IntType) for k in kinds):
            names.add(f.encode_name)
    return frozenset(names)


_INTEGER_FIELDS = _integer_fields(HeartbeatIn)


def _integral_floats_as_ints(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with 80.0 read as 80 in integer fields (JSON Schema's integers, and the document's:
    a number with no fraction is one); ``raw`` itself when there is none. Only on the error path."""
    fixed = {k: int(v) for k, v in raw.items()
             if k in _INTEGER_FIELDS and isinstance(v, float) and v.is_integer() and abs(v) < 2**63}
    return {**raw, **fixed} if fixed else raw


def parse_heartbeat(body: bytes, device_id: int, settings: Settings, now: datetime) -> tuple[HeartbeatRow, bool]:
    """Validate a heartbeat body into a row; raises a 400/422 ApiError naming the problem."""
    raw = decode_json(body)
    if not isinstance(raw, dict):
        raise ApiError(422, "validation_failed", "the body must be a JSON object")
    try:
        hb = msgspec.convert(raw, HeartbeatIn)
    except msgspec.ValidationError as exc:
        whole = _integral_floats_as_ints(raw)
        if whole is raw:
            raise ApiError(422, "validation_failed", str(exc)) from None
        try:
            hb = msgspec.convert(whole, HeartbeatIn)
        except msgspec.ValidationError as again:
            raise ApiError(422, "validation_failed", str(again)) from None
    extra_json = None
    if len(raw) > len(_KNOWN_FIELDS) or not _KNOWN_FIELDS.issuperset(raw):
        extra = {k: v for k, v in raw.items() if k not in _KNOWN_FIELDS}
        if extra:
            if _nesting_depth(extra) > MAX_EXTRA_DEPTH:
                raise ApiError(422, "extra_too_deep", f"fields beyond the schema nest deeper than {MAX_EXTRA_DEPTH}")
            encoded = msgspec.json.encode(extra)
            if len(encoded) > settings.max_extra_bytes:
                raise ApiError(
                    422, "extra_too_large",
                    f"fields beyond the schema take {len(encoded)} bytes; at most {settings.max_extra_bytes}",
                )
            extra_json = encoded.decode()
    try:
        # In UTC: PostgreSQL refuses zone offsets beyond 15:59 that Python accepts.
        sent_at = hb.sent_at.astimezone(UTC)
    except OverflowError:
        raise ApiError(422, "validation_failed", "sent_at is out of range") from None
    bucket, skew_s, corrected = choose_bucket(
        sent_at, now, settings.dedup_bucket_seconds, settings.max_clock_skew_seconds
    )
    row = HeartbeatRow(
        device_id=device_id,
        bucket_ts=bucket,
        sent_at=sent_at,
        received_at=now,
        clock_skew_s=round(skew_s, 3),
        battery_pct=hb.battery_pct,
        charging=hb.charging,
        network_type=hb.network_type,
        signal_dbm=hb.signal_dbm,
        app_version=hb.app_version,
        os_version=hb.os_version,
        uptime_s=hb.uptime_s,
        free_storage_mb=hb.free_storage_mb,
        extra_json=extra_json,
    )
    return row, corrected


def _is_missing_partition(exc: BaseException) -> bool:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return isinstance(orig, pg_errors.CheckViolation) and "no partition" in str(orig)


def create_missing_partitions(engine: Engine, rows: list[HeartbeatRow], settings: Settings) -> None:
    """Create the daily partitions these rows need, and the usual ones ahead of today."""
    with engine.begin() as conn:
        for day in sorted({r.bucket_ts.date() for r in rows}):
            ensure_partitions(conn, day, 0)
        ensure_partitions(conn, datetime.now(UTC).date(), settings.partition_premake_days)


def write_batch(engine: Engine, rows: list[HeartbeatRow], settings: Settings) -> list[bool]:
    """Store rows in one transaction and return per-row stored flags, after COMMIT.

    A row outside every partition (the partition job has not run for days) makes the writer
    create the missing daily partitions and try once more. Database faults become
    DatabaseUnavailable (503 + Retry-After): nothing was acknowledged, the device retries.
    """
    try:
        try:
            with engine.begin() as conn:
                return insert_heartbeats(conn, rows)
        except DBAPIError as exc:
            if not _is_missing_partition(exc):
                raise
            create_missing_partitions(engine, rows, settings)
            with engine.begin() as conn:
                return insert_heartbeats(conn, rows)
    except PoolTimeout:
        raise DatabaseUnavailable("no database connection free in time", retry_after_s=1) from None
    except OperationalError as exc:
        raise DatabaseUnavailable("the database cannot be reached", retry_after_s=2) from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise DatabaseUnavailable("the database connection was lost", retry_after_s=2) from exc
        raise


FlushListener = Callable[[int, float], None]
_SOJOURN_PROBE_S = 0.01


class DirectWriter:
    """One transaction per heartbeat."""

    def __init__(self, engine: Engine, settings: Settings, on_flush: FlushListener | None = None) -> None:
        self._engine = engine
        self._settings = settings
        self._on_flush = on_flush

    def write(self, row: HeartbeatRow) -> bool:
        """Store one heartbeat; True if stored, False if a duplicate. After COMMIT."""
        started = time.perf_counter()
        stored = write_batch(self._engine, [row], self._settings)[0]
        if self._on_flush:
            self._on_flush(1, time.perf_counter() - started)
        return stored

    def check_admission(self, now: float | None = None) -> None:
        """Always admits: without gevent every request has its own thread and connection."""

    def stats(self) -> dict[str, Any]:
        return {"mode": "direct"}


class GroupCommitWriter:
    """Group commit under gevent (see the module docstring).

    One flusher by default: while a batch is in flight the next one gathers, so batches grow
    with load and the cost per heartbeat falls (measured: two flushers cost 2.3x the database
    CPU per heartbeat of one). Each flusher keeps one pooled connection checked out for its
    lifetime, PREPAREs the insert on it once (unless DB_PREPARED_STATEMENTS is off: PgBouncer in
    transaction mode), and uses its DBAPI cursor directly; a connection
    that fails is invalidated and a fresh one taken for the next batch.
    """

    def __init__(self, engine: Engine, settings: Settings, on_flush: FlushListener | None = None) -> None:
        self._engine = engine
        self._settings = settings
        self._on_flush = on_flush
        self._queue: Queue = Queue(maxsize=settings.ingest_queue_max)
        flushers = max(1, settings.ingest_flushers)
        # Per flusher: when the oldest heartbeat of the batch it is writing was queued (or None).
        self._flushing: list[float | None] = [None] * flushers
        self._flushers = [gevent.spawn(self._run, i) for i in range(flushers)]
        self._conns: dict[int, Any] = {}
        self._linger_s = settings.ingest_linger_ms / 1000
        self.shedder = CoDelShedder(settings.ingest_shed_target_ms / 1000, settings.ingest_shed_interval_ms / 1000)
        self.loop_lag_s = 0.0  # how late the last sojourn probe woke up
        self._prober = gevent.spawn(self._probe_sojourn)
        self.flushes = 0
        self.rows = 0
        self.shed = 0

    def write(self, row: HeartbeatRow) -> bool:
        """Queue one heartbeat and wait until its batch has committed."""
        result = AsyncResult()
        now = time.monotonic()
        try:
            self._queue.put_nowait((row, result, now))
        except Full:
            self.shed += 1
            raise Overloaded("the ingest queue is full; retry shortly", retry_after_s=1) from None
        try:
            return result.get(timeout=self._settings.ingest_timeout_s)
        except Timeout:
            raise DatabaseUnavailable("the write did not complete in time; retry (it is deduplicated)") from None

    def check_admission(self, now: float | None = None) -> None:
        """Raise Overloaded (503 + Retry-After) for the share of new heartbeats the CoDel-style
        shedder refuses (api/shedding.py): it grows while what was admitted waits longer than
        INGEST_SHED_TARGET_MS for a whole INGEST_SHED_INTERVAL_MS, because the event loop runs
        late (CPU) or queued heartbeats are not written (database). Cheap; called before a
        request does any work."""
        shedder = self.shedder
        if not shedder.admit():
            self.shed += 1
            raise Overloaded("the server is busy; retry later", retry_after_s=shedder.retry_after_s)

    @property
    def shed_fraction(self) -> float:
        """The share of new heartbeats refused now."""
        return self.shedder.shed_fraction

    def _probe_sojourn(self) -> None:
        """Every 10 ms, one sojourn sample for the shedder: the worse of how late this greenlet
        woke up (a runnable request waits as long for the CPU) and how long the oldest queued
        heartbeat has waited to be written."""
        shedder = self.shedder
        queue = self._queue
        while True:
            started = time.monotonic()
            gevent.sleep(_SOJOURN_PROBE_S)
            now = time.monotonic()
            self.loop_lag_s = now - started - _SOJOURN_PROBE_S
            head_wait = now - queue.peek_nowait()[2] if queue.qsize() else 0.0
            shedder.observe(max(self.loop_lag_s, head_wait), now)

    def _run(self, index: int) -> None:
        while True:
            batch = [self._queue.get()]
            self._linger(batch)
            gevent.sleep(0)  # let requests that are ready join this batch
            while len(batch) < self._settings.ingest_batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                except Empty:
                    break
            started = time.perf_counter()
            self._flushing[index] = batch[0][2]
            try:
                stored = self._flush([row for row, _, _ in batch])
            except Exception as exc:  # every waiter learns the outcome; the flusher lives on
                self._flushing[index] = None
                if not isinstance(exc, DatabaseUnavailable):
                    log.exception("heartbeat flush failed")
                for _, result, _ in batch:
                    result.set_exception(exc)
                continue
            self._flushing[index] = None
            self.flushes += 1
            self.rows += len(batch)
            if self._on_flush:
                self._on_flush(len(batch), time.perf_counter() - started)
            for (_, result, _), flag in zip(batch, stored, strict=True):
                result.set(flag)

    def _linger(self, batch: list[Any]) -> None:
        """Wait up to INGEST_LINGER_MS for the batch to reach INGEST_LINGER_ROWS (see Settings)."""
        if not self._linger_s:
            return
        deadline = time.monotonic() + self._linger_s
        while len(batch) + self._queue.qsize() < self._settings.ingest_linger_rows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                batch.append(self._queue.get(timeout=remaining))
            except Empty:
                return

    def _flush(self, rows: list[HeartbeatRow]) -> list[bool]:
        """One transaction on this flusher's own connection; stored flags after COMMIT."""
        key = id(gevent.getcurrent())
        for attempt in (1, 2):
            conn = self._conns.get(key)
            if conn is None:
                # raw_connection() goes straight to the pool, so a failed connect raises the
                # driver's own error (psycopg2.OperationalError), not SQLAlchemy's DBAPIError.
                try:
                    conn = self._engine.raw_connection()
                except PoolTimeout:
                    raise DatabaseUnavailable("no database connection free in time", retry_after_s=1) from None
                except (DBAPIError, psycopg2.Error) as exc:
                    raise DatabaseUnavailable("the database cannot be reached", retry_after_s=2) from exc
                try:
                    # One statement per batch, so autocommit makes it its own transaction:
                    # one round trip instead of three (BEGIN, EXECUTE, COMMIT). PostgreSQL
                    # commits before it reports the statement complete, so the rows are
                    # committed when the result arrives.
                    conn.driver_connection.autocommit = True
                    if self._settings.db_prepared_statements:
                        prepare_insert(conn)
                except psycopg2.Error as exc:
                    try:
                        conn.invalidate()
                    except Exception:  # already broken; the pool forgets it either way
                        log.debug("invalidate failed", exc_info=True)
                    raise DatabaseUnavailable("the database cannot be reached", retry_after_s=2) from exc
                self._conns[key] = conn
            try:
                return insert_heartbeats(conn, rows, prepared=self._settings.db_prepared_statements)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                # The connection is gone (database restart, network): outcome unknown, nothing
                # acknowledged; a retry by the device is deduplicated.
                self._discard(key)
                # A lost connection usually means the database restarted: every idle pooled
                # connection is stale too. Replace the pool (checked-out ones close on return)
                # so the next requests connect afresh instead of failing one by one.
                self._engine.dispose()
                raise DatabaseUnavailable("the database connection was lost", retry_after_s=2) from exc
            except psycopg2.Error as exc:  # autocommit: the failed statement left nothing open
                if attempt == 1 and _is_missing_partition(exc):
                    create_missing_partitions(self._engine, rows, self._settings)
                    continue
                raise
        raise AssertionError("unreachable")

    def _discard(self, key: int) -> None:
        conn = self._conns.pop(key, None)
        if conn is not None:
            try:
                conn.invalidate()
            except Exception:  # already broken; the pool forgets it either way
                log.debug("invalidate failed", exc_info=True)

    def stats(self) -> dict[str, Any]:
        return {
            "mode": "group_commit",
            "queued": self._queue.qsize(),
            "flushes": self.flushes,
            "rows": self.rows,
            "mean_batch": round(self.rows / self.flushes, 2) if self.flushes else 0.0,
            "shed": self.shed,
            "loop_lag_ms": round(self.loop_lag_s * 1000, 1),
            "shed_fraction": round(self.shed_fraction, 2),
            "sojourn_min_ms": round(self.shedder.last_min_s * 1000, 1),
        }


def make_writer(
    engine: Engine, settings: Settings, on_flush: FlushListener | None = None
) -> DirectWriter | GroupCommitWriter:
    """GroupCommitWriter under gevent, else DirectWriter."""
    if gevent_active():
        return GroupCommitWriter(engine, settings, on_flush)
    return DirectWriter(engine, settings, on_flush)
