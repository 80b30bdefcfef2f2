"""Writing heartbeats (with the device_last_status upsert) and reading history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

COLUMNS = (
    "device_id", "bucket_ts", "sent_at", "received_at", "clock_skew_s", "battery_pct", "charging",
    "network_type", "signal_dbm", "app_version", "os_version", "uptime_s", "free_storage_mb",
)
STATUS_COLUMNS = COLUMNS  # device_last_status has the same columns, without extra


@dataclass(frozen=True, slots=True)
class HeartbeatRow:
    """One validated heartbeat, ready to store. ``extra_json`` is already-encoded JSON."""

    device_id: int
    bucket_ts: datetime
    sent_at: datetime
    received_at: datetime
    clock_skew_s: float
    battery_pct: int
    charging: bool
    network_type: str
    signal_dbm: int | None
    app_version: str
    os_version: str
    uptime_s: int
    free_storage_mb: int
    extra_json: str | None = None

    @property
    def key(self) -> tuple[int, datetime]:
        return (self.device_id, self.bucket_ts)


_SET_STATUS = ",\n            ".join(f"{c} = EXCLUDED.{c}" for c in STATUS_COLUMNS[1:])
_INSERT_SQL = f"""
WITH data AS (
    SELECT * FROM unnest(
        %(device_id)s::bigint[], %(bucket_ts)s::timestamptz[], %(sent_at)s::timestamptz[],
        %(received_at)s::timestamptz[], %(clock_skew_s)s::real[], %(battery_pct)s::smallint[],
        %(charging)s::boolean[], %(network_type)s::text[], %(signal_dbm)s::smallint[],
        %(app_version)s::text[], %(os_version)s::text[], %(uptime_s)s::bigint[],
        %(free_storage_mb)s::integer[], %(extra)s::text[]
    ) AS t({", ".join(COLUMNS)}, extra)
),
ins AS (
    INSERT INTO heartbeats ({", ".join(COLUMNS)}, extra)
    SELECT {", ".join(COLUMNS)}, extra::jsonb FROM data
    ON CONFLICT DO NOTHING
    RETURNING {", ".join(COLUMNS)}
),
status AS (
    INSERT INTO device_last_status ({", ".join(STATUS_COLUMNS)})
    SELECT DISTINCT ON (device_id) {", ".join(STATUS_COLUMNS)}
    FROM ins
    ORDER BY device_id, bucket_ts DESC
    ON CONFLICT (device_id) DO UPDATE SET
            {_SET_STATUS}
        WHERE device_last_status.bucket_ts < EXCLUDED.bucket_ts
)
SELECT device_id, bucket_ts FROM ins
"""


def insert_heartbeats(conn: Connection, rows: list[HeartbeatRow]) -> list[bool]:
    """Store heartbeats and move device_last_status forward, in one statement.

    Returns, per row, True when it was stored and False when it duplicates a stored one (the
    same device and bucket, earlier or in this same batch). Caller commits.
    Rows are sorted by device so concurrent batches lock status rows in one order.
    """
    if not rows:
        return []
    ordered = sorted(rows, key=lambda r: (r.device_id, r.bucket_ts))
    params: dict[str, list[Any]] = {c: [getattr(r, c) for r in ordered] for c in COLUMNS}
    params["extra"] = [r.extra_json for r in ordered]
    stored_keys = {(d, b) for d, b in conn.exec_driver_sql(_INSERT_SQL, params).fetchall()}
    result = []
    for row in rows:
        key = row.key
        if key in stored_keys:
            stored_keys.discard(key)  # a second copy in the same batch is a duplicate
            result.append(True)
        else:
            result.append(False)
    return result


def list_heartbeats(
    conn: Connection, device_id: int, since: datetime, until: datetime, limit: int
) -> list[dict[str, Any]]:
    """A device's heartbeats with since <= bucket_ts < until, newest first.

    The range arrives as constants in the SQL text (psycopg2 interpolates client-side), so the
    planner prunes to the partitions in range.
    """
    result = conn.exec_driver_sql(
        f"""
        SELECT {", ".join(COLUMNS)}, extra FROM heartbeats
        WHERE device_id = %(id)s AND bucket_ts >= %(since)s AND bucket_ts < %(until)s
        ORDER BY bucket_ts DESC
        LIMIT %(limit)s
        """,
        {"id": device_id, "since": since, "until": until, "limit": limit},
    )
    return [dict(r._mapping) for r in result]


def explain_history(conn: Connection, device_id: int, since: datetime, until: datetime) -> str:
    """The plan of a history read (to show and test partition pruning)."""
    rows = conn.exec_driver_sql(
        """
        EXPLAIN SELECT * FROM heartbeats
        WHERE device_id = %(id)s AND bucket_ts >= %(since)s AND bucket_ts < %(until)s
        """,
        {"id": device_id, "since": since, "until": until},
    ).fetchall()
    return "\n".join(r[0] for r in rows)
