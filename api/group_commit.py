"""Group commit: the one heartbeat writer, ``write(row) -> stored``, answered only after COMMIT.

A flusher greenlet per worker drains a bounded queue of concurrent heartbeats into one
multi-row statement on its own connection (db.ingest.IngestConnection, in autocommit), then
wakes every waiting request; under moderate load it lingers a few milliseconds for a bigger
batch. Under overload it sheds (503 + Retry-After) instead of letting latency grow without
bound, before any work: a growing share of requests while what was admitted spends longer than
INGEST_SHED_TARGET_MS in the server (from its arrival to its acknowledgement: waiting for the CPU or for
the database), those that would find more heartbeats in flight than the worker acknowledges in
that time (see api/shedding.py), and every request while the queue is full.

The same writer serves gunicorn's gevent workers and the in-process tests (Flask's test client
in a plain thread: its greenlets run while the request waits for its batch). Only the shedder's
sojourn samples need gevent's monkey-patching: without it, blocking calls do not yield, so the
loop's lateness and a heartbeat's wait would measure the caller's own work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult
from gevent.queue import Empty, Full, Queue
from gevent.timeout import Timeout
from sqlalchemy import Engine

from api.concurrency import gevent_active
from api.shedding import CoDelShedder, run_delay_s
from config.settings import Settings
from db.errors import DatabaseUnavailable, Overloaded
from db.heartbeats import HeartbeatRow
from db.ingest import IngestConnection

log = logging.getLogger(__name__)

FlushListener = Callable[[int, float], None]
_SOJOURN_PROBE_S = 0.01


class GroupCommitWriter:
    """Group commit (see the module docstring).

    One flusher by default: while a batch is in flight the next one gathers, so batches grow
    with load and the cost per heartbeat falls (measured: two flushers cost 2.3x the database
    CPU per heartbeat of one). Each flusher owns one IngestConnection for its lifetime (one
    pooled connection, the insert PREPAREd on it once unless DB_PREPARED_STATEMENTS is off);
    ``close`` stops the greenlets and closes those connections.

    ``shed``: feed the shedder (each answered heartbeat's sojourn, and the probe); by default
    only when gevent has patched the standard library (see the module docstring). Without it
    only a full queue is refused.
    """

    def __init__(
        self, engine: Engine, settings: Settings, on_flush: FlushListener | None = None,
        *, shed: bool | None = None,
    ) -> None:
        self._settings = settings
        self._on_flush = on_flush
        self._queue: Queue = Queue(maxsize=settings.ingest_queue_max)
        flushers = max(1, settings.ingest_flushers)
        # Per flusher: when the oldest heartbeat of the batch it is writing was queued (or None).
        self._flushing: list[float | None] = [None] * flushers
        self._connections = [
            IngestConnection(engine, settings.partition_premake_days, prepared=settings.db_prepared_statements)
            for _ in range(flushers)
        ]
        self._flushers = [gevent.spawn(self._run, i) for i in range(flushers)]
        self._linger_s = settings.ingest_linger_ms / 1000
        self.shedder = CoDelShedder(settings.ingest_shed_target_ms / 1000, settings.ingest_shed_interval_ms / 1000,
                                    retry_after_max_s=settings.ingest_shed_retry_after_max_s,
                                    limit_max=settings.ingest_queue_max, run_delay=run_delay_s)
        self.in_flight = 0  # admitted heartbeats not yet answered (check_admission .. release)
        self.loop_lag_s = 0.0  # how late the last sojourn probe woke up
        self._sampling = gevent_active() if shed is None else shed
        self._prober = gevent.spawn(self._probe_sojourn) if self._sampling else None
        self.flushes = 0
        self.rows = 0
        self.shed = 0

    def write(self, row: HeartbeatRow, arrived: float | None = None) -> bool:
        """Queue one heartbeat and wait until its batch has committed. ``arrived``: when its
        request reached the server (``time.monotonic()``, api/clients.py request_arrival); once
        acknowledged, its time from then to now is the shedder's sojourn sample."""
        result = AsyncResult()
        now = time.monotonic()
        try:
            self._queue.put_nowait((row, result, now))
        except Full:
            self.shed += 1
            raise Overloaded("the ingest queue is full; retry shortly", retry_after_s=1) from None
        try:
            stored = result.get(timeout=self._settings.ingest_timeout_s)
        except Timeout:
            raise DatabaseUnavailable("the write did not complete in time; retry (it is deduplicated)") from None
        # Only what was acknowledged is a sample: a write the database refused (a statement
        # timeout, a lost connection) says nothing of a queue, and its error is answered at once.
        if self._sampling:
            done = time.monotonic()
            self.shedder.observe(done - (now if arrived is None else arrived), done)
        return stored

    def check_admission(self) -> None:
        """Raise Overloaded (503 + Retry-After) for a new heartbeat the shedder refuses
        (api/shedding.py): while what was admitted spends longer than INGEST_SHED_TARGET_MS in the
        server for a whole INGEST_SHED_INTERVAL_MS (waiting for the CPU or the database), those
        that would find more in flight than the worker acknowledges in that time. Cheap; called
        before a request does any work. Each admission is paired with one ``release``."""
        shedder = self.shedder
        if not shedder.admit(self.in_flight):
            self.shed += 1
            raise Overloaded("the server is busy; retry later", retry_after_s=shedder.retry_after_s)
        self.in_flight += 1

    def release(self) -> None:
        """An admitted heartbeat was answered (acknowledged or not)."""
        self.in_flight -= 1

    @property
    def shed_fraction(self) -> float:
        """The share of new heartbeats refused in the last second."""
        return self.shedder.refused_share

    def _probe_sojourn(self) -> None:
        """Every 10 ms, a probe sample for the shedder (used in an interval in which no heartbeat
        was answered): the worse of how late this greenlet woke up (a runnable request waits as
        long for the CPU) and how long the oldest queued heartbeat has waited to be written."""
        shedder = self.shedder
        queue = self._queue
        while True:
            started = time.monotonic()
            gevent.sleep(_SOJOURN_PROBE_S)
            now = time.monotonic()
            self.loop_lag_s = now - started - _SOJOURN_PROBE_S
            head_wait = now - queue.peek_nowait()[2] if queue.qsize() else 0.0
            shedder.observe_probe(max(self.loop_lag_s, head_wait), now)

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
                stored = self._connections[index].insert([row for row, _, _ in batch])
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

    def close(self) -> None:
        """Stop the flushers and the lag watcher, fail what is still queued (nothing of it was
        acknowledged), and close the flushers' connections."""
        gevent.killall([*self._flushers, *([self._prober] if self._prober else [])])
        while True:
            try:
                _, result, _ = self._queue.get_nowait()
            except Empty:
                break
            result.set_exception(DatabaseUnavailable("the writer stopped; retry (it is deduplicated)"))
        for connection in self._connections:
            connection.close()

    def stats(self) -> dict[str, Any]:
        """Counters for /ops and the tests: batches, rows, shedding, connections held."""
        return {
            "mode": "group_commit",
            "queued": self._queue.qsize(),
            "flushes": self.flushes,
            "rows": self.rows,
            "mean_batch": round(self.rows / self.flushes, 2) if self.flushes else 0.0,
            "shed": self.shed,
            "loop_lag_ms": round(self.loop_lag_s * 1000, 1),
            "shed_fraction": round(self.shed_fraction, 2),
            "overloaded": self.shedder.overloaded,
            "in_flight": self.in_flight,
            "in_flight_limit": self.shedder.limit,
            "sojourn_min_ms": round(self.shedder.last_min_s * 1000, 1),
            "cpu_wait_share": round(self.shedder.starved_share, 2),
            "connections": sum(c.open for c in self._connections),
        }
