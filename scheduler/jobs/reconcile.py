"""The reconcile job: heal device_last_status drift from the heartbeats table.

A device drifts when its device_last_status row is missing, or older than its newest stored
heartbeat (a restore, a manual fix, a bug): one with a later bucket that also arrived later (the
status row follows what arrived last, so a heartbeat from a clock far ahead that was followed by
correct ones is not newer). ``heal_last_status`` finds and heals every such
device in one statement: for each device, an index probe into heartbeats for a row newer than
its status (run-time partition pruning skips every partition older than that status, so a
healthy device costs a probe of today's partition), then one INSERT ... ON CONFLICT for the
ones found. No per-device round trips.

There is no pure ``plan_*`` here: the plan *is* the drift, and only the database can see it
without shipping 100,000 rows to Python; ``count_drift`` answers "what would change" read-only.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, Engine

from db.heartbeats import STATUS_COLUMNS
from scheduler.locking import JobOutcome, Progress

_COLS = ", ".join(STATUS_COLUMNS)
_H_COLS = ", ".join(f"h.{c}" for c in STATUS_COLUMNS)
_SETS = ", ".join(f"{c} = EXCLUDED.{c}" for c in STATUS_COLUMNS[1:])

_NEWER = f"""
    SELECT s.device_id IS NULL AS missing, h.*
    FROM devices d
    LEFT JOIN device_last_status s ON s.device_id = d.id
    CROSS JOIN LATERAL (
        SELECT {_H_COLS} FROM heartbeats h
        WHERE h.device_id = d.id AND h.bucket_ts > COALESCE(s.bucket_ts, '-infinity'::timestamptz)
          AND h.received_at > COALESCE(s.received_at, '-infinity'::timestamptz)
        ORDER BY h.bucket_ts DESC
        LIMIT 1
    ) h
"""


@dataclass(frozen=True)
class Drift:
    """Devices whose status row is missing, and whose status row is older than a heartbeat."""

    missing: int
    stale: int

    @property
    def total(self) -> int:
        return self.missing + self.stale


def count_drift(conn: Connection) -> Drift:
    """How many devices drift, read-only."""
    row = conn.exec_driver_sql(
        f"SELECT count(*) FILTER (WHERE missing), count(*) FILTER (WHERE NOT missing) FROM ({_NEWER}) x"
    ).one()
    return Drift(missing=row[0], stale=row[1])


def heal_last_status(conn: Connection) -> Drift:
    """Insert missing and move stale device_last_status rows to each device's newest heartbeat,
    in one statement; returns what it healed. Idempotent. Caller commits."""
    row = conn.exec_driver_sql(
        f"""
        WITH newer AS ({_NEWER}),
        healed AS (
            INSERT INTO device_last_status ({_COLS})
            SELECT {_COLS} FROM newer
            ORDER BY device_id  -- the ingest path's lock order, so the two cannot deadlock
            ON CONFLICT (device_id) DO UPDATE SET {_SETS}
                WHERE device_last_status.received_at < EXCLUDED.received_at
            RETURNING (xmax = 0) AS inserted
        )
        SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM healed
        """
    ).one()
    return Drift(missing=row[0], stale=row[1])


def run_reconcile(engine: Engine, *, statement_timeout_ms: int, progress: Progress) -> JobOutcome:
    """The reconcile job body."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}")
        devices = conn.exec_driver_sql("SELECT count(*) FROM devices").scalar_one()
        progress(f"checking device_last_status of {devices:,} devices against heartbeats")
        healed = heal_last_status(conn)
    progress(f"healed {healed.total:,} devices: {healed.missing:,} missing status rows inserted, "
             f"{healed.stale:,} stale rows moved forward")
    return JobOutcome(rows_affected=healed.total,
                      detail={"devices": devices, "inserted": healed.missing, "updated": healed.stale})
