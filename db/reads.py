"""Where the operator plane's reads go: a streaming replica while it is fresh enough, else the
primary. Writes, token look-ups and jobs never come here: they use the primary's engine.

The lag guard measures the replica's lag once a second (``measure``): an upper bound on how
old the replica's view is, the smaller of two bounds that each hold on their own —
- the primary's WAL position is sampled at each measurement; once the replica has replayed past
  a sample taken at time t, it holds everything committed before t, so the lag is at most
  ``now - t`` for the newest such sample (0 when it has replayed past the one just taken);
- the replica holds every transaction up to the last one it replayed, so the lag is at most
  ``now - pg_last_xact_replay_timestamp()`` (tight under steady writes; large after an idle
  spell, which the first bound corrects).
Replay paused or the replica cut off: both bounds grow by a second each second. Reads go to the
replica while it answered the last measurement and the bound (plus the measurement's age) is
within READ_MAX_LAG_S; a read that fails on the replica (stopped, connection lost) is answered
from the primary at once and marks the replica down until a measurement succeeds again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import psycopg2
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from config.settings import Settings
from db.engine import make_engine, reading
from db.errors import DatabaseUnavailable, DeviceNotFound, fault_summary

T = TypeVar("T")
log = logging.getLogger(__name__)

PRIMARY, REPLICA = "primary", "replica"
# Replica faults that send a read to the primary instead: the replica unreachable, its connection
# lost, a query cancelled by recovery or its pool exhausted (db.errors.domain_error makes these
# DatabaseUnavailable at reading()'s edge), and any other driver error, also the driver's own,
# unwrapped. A query that is wrong in itself fails on the primary as well and surfaces from there.
_REPLICA_FAULTS = (DatabaseUnavailable, DBAPIError, psycopg2.Error)


def parse_lsn(text: str) -> int:
    """A pg_lsn such as ``0/3000148`` as an integer (bytes of WAL)."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


@dataclass(frozen=True)
class ReadSource:
    """Where one read was answered from, and the replica's lag bound at the time (None when
    there is no replica or it cannot be reached)."""

    name: str
    replica_lag_s: float | None


@dataclass(frozen=True)
class ReplicaState:
    """The last measurement: reachable, the lag bound (s), when (monotonic), and any error."""

    reachable: bool
    lag_s: float | None
    measured_mono: float
    error: str | None = None


class ReadRouter:
    """Routes reads between the primary and an optional replica, by the lag guard's figures.

    ``probe_primary``/``probe_replica``: small engines of their own for the measurements, so a
    busy read pool never delays the guard. ``clock`` (monotonic seconds) and ``wall`` (Unix
    seconds) are injectable for tests.
    """

    def __init__(
        self, primary: Engine, replica: Engine | None = None, *, max_lag_s: float = 5.0,
        probe_primary: Engine | None = None, probe_replica: Engine | None = None,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
        on_measure: Callable[[ReplicaState], None] | None = None,
    ) -> None:
        self.primary = primary
        self.replica = replica
        self.max_lag_s = max_lag_s
        self.probe_primary = probe_primary or primary
        self.probe_replica = probe_replica or replica
        self.clock = clock
        self.wall = wall
        self.on_measure = on_measure
        self._samples: deque[tuple[float, int]] = deque()
        # Until the first measurement the replica is not trusted.
        self.state = ReplicaState(False, None, clock(), "not measured yet")
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """True when a replica is configured (READ_DATABASE_URL)."""
        return self.replica is not None

    # -- the lag guard ----------------------------------------------------------------------
    def measure(self) -> ReplicaState:
        """One measurement of the replica's lag (the guard calls it every second)."""
        if self.replica is None:
            return self.state
        now = self.clock()
        primary_lsn = self._primary_lsn()
        if primary_lsn is not None:
            self._samples.append((now, primary_lsn))
            # Keep what can still bound the lag below the limit, and one sample older than that.
            while len(self._samples) > 2 and now - self._samples[1][0] > self.max_lag_s + 2:
                self._samples.popleft()
        try:
            with reading(self.probe_replica) as conn:
                in_recovery, replay, receive, replay_age_s = conn.exec_driver_sql(
                    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text, "
                    "extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8"
                ).one()
        except (DatabaseUnavailable, DBAPIError) as exc:
            return self._set(ReplicaState(False, None, now, fault_summary(exc)))
        if not in_recovery:
            return self._set(ReplicaState(False, None, now, "READ_DATABASE_URL is not a standby (not in recovery)"))
        lag_s = self._lag_bound(now, primary_lsn, replay, receive, replay_age_s)
        return self._set(ReplicaState(True, lag_s, now))

    def _primary_lsn(self) -> int | None:
        try:
            with reading(self.probe_primary) as conn:
                return parse_lsn(conn.exec_driver_sql("SELECT pg_current_wal_lsn()::text").scalar_one())
        except (DatabaseUnavailable, DBAPIError) as exc:
            log.warning("replica lag guard: the primary's WAL position is unavailable: %s", fault_summary(exc))
            return None

    def _lag_bound(self, now: float, primary_lsn: int | None, replay: str | None, receive: str | None,
                   replay_age_s: float | None) -> float:
        replayed = parse_lsn(replay) if replay else -1
        by_timestamp = max(0.0, replay_age_s) if replay_age_s is not None else float("inf")
        if primary_lsn is None:  # the primary cannot be asked: what the replica knows of itself
            return 0.0 if replay is not None and replay == receive else by_timestamp
        if replayed >= primary_lsn:
            return 0.0
        by_samples = float("inf")
        for taken, lsn in reversed(self._samples):
            if lsn <= replayed:
                by_samples = now - taken
                break
        else:
            if self._samples:  # none covered: older than the oldest sample kept
                by_samples = now - self._samples[0][0]
        return round(min(by_timestamp, by_samples), 3)

    def _set(self, state: ReplicaState) -> ReplicaState:
        with self._lock:
            self.state = state
        if self.on_measure is not None:
            self.on_measure(state)
        return state

    def mark_down(self, error: str) -> None:
        """The replica failed a read: send reads to the primary until a measurement succeeds."""
        self._set(ReplicaState(False, None, self.clock(), error))

    def lag_bound_s(self) -> float | None:
        """The replica's lag bound now: the last measurement's plus its age (a stalled guard
        cannot keep a replica in use); None without a replica or while it is unreachable."""
        state = self.state
        if self.replica is None or not state.reachable or state.lag_s is None:
            return None
        return round(state.lag_s + max(0.0, self.clock() - state.measured_mono), 3)

    def use_replica(self) -> bool:
        """True when reads should go to the replica now."""
        bound = self.lag_bound_s()
        return bound is not None and bound <= self.max_lag_s

    def run_guard(self, sleep: Callable[[float], None], interval_s: float = 1.0,
                  stop: Callable[[], bool] = lambda: False) -> None:
        """Measure every ``interval_s`` until ``stop()``; ``sleep`` is gevent's or time's."""
        while not stop():
            started = self.clock()
            try:
                self.measure()
            except Exception:  # noqa: BLE001 - the guard must outlive any one failure
                log.exception("replica lag guard: measurement failed")
                self.mark_down("measurement failed")
            sleep(max(0.0, interval_s - (self.clock() - started)))

    # -- reads ------------------------------------------------------------------------------
    def read(self, query: Callable[..., T], *, missing_on_replica_ok: bool = False,
             primary_only: bool = False) -> tuple[T, ReadSource]:
        """Run ``query(conn)`` (autocommit) on the replica when fresh enough, else on the primary;
        always on the primary with ``primary_only`` (a reader that must see every commit).

        A replica fault answers from the primary at once. A DeviceNotFound on the replica is
        asked again of the primary (a device enrolled a moment ago may not have arrived yet),
        unless ``missing_on_replica_ok``."""
        lag_s = self.lag_bound_s()
        if not primary_only and lag_s is not None and lag_s <= self.max_lag_s:
            try:
                with reading(self.replica) as conn:
                    return query(conn), ReadSource(REPLICA, lag_s)
            except DeviceNotFound:
                if missing_on_replica_ok:
                    raise
            except _REPLICA_FAULTS as exc:
                log.warning("read from the replica failed, answering from the primary: %s", fault_summary(exc))
                self.mark_down(fault_summary(exc))
        with reading(self.primary) as conn:
            return query(conn), ReadSource(PRIMARY, self.lag_bound_s())



def make_read_router(
    settings: Settings, primary: Engine, on_measure: Callable[[ReplicaState], None] | None = None
) -> ReadRouter:
    """The router of one process: the replica's engines when READ_DATABASE_URL is set (its read
    pool sized like the primary's; a one-connection engine on each side for the guard), else
    every read on ``primary``. Create it after gunicorn forks, like every engine."""
    url = settings.read_database_url
    if not url:
        return ReadRouter(primary, max_lag_s=settings.read_max_lag_s)
    probe = settings.with_overrides(db_pool_size=1, db_max_overflow=0, db_pool_timeout_s=2.0,
                                    db_statement_timeout_ms=2000)
    return ReadRouter(
        primary, make_engine(settings, url, application_name="nexmdm-replica-reads"),
        max_lag_s=settings.read_max_lag_s,
        probe_primary=make_engine(probe, settings.database_url, application_name="nexmdm-lag-guard"),
        probe_replica=make_engine(probe, url, application_name="nexmdm-lag-guard"),
        on_measure=on_measure,
    )
