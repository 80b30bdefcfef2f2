"""Writing heartbeats (with the device_last_status upsert) and reading history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy import Connection
from sqlalchemy.engine.interfaces import DBAPIConnection

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class HeartbeatRow(msgspec.Struct):
    """One validated heartbeat, ready to store: the one definition of the heartbeat's columns
    in code (db/models.py documents them, the migrations create them; tests check all agree).

    Encoded as is (C, msgspec) into the JSON rows the insert expands; ``extra_json`` is the
    already-encoded JSON of the fields beyond the schema, stored in the ``extra`` column."""

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
    extra_json: msgspec.Raw | None = msgspec.field(default=None, name="extra")

    @property
    def key(self) -> tuple[int, int]:
        """(device, bucket in epoch microseconds): what the primary key makes unique."""
        return (self.device_id, (self.bucket_ts - _EPOCH) // _MICROSECOND)


# heartbeats has these columns and ``extra``; device_last_status has these.
COLUMNS: tuple[str, ...] = tuple(c for c in HeartbeatRow.__struct_encode_fields__ if c != "extra")
STATUS_COLUMNS = COLUMNS


_SET_STATUS = ",\n            ".join(f"{c} = EXCLUDED.{c}" for c in STATUS_COLUMNS[1:])
# The batch travels as one JSON text that PostgreSQL expands (json_populate_recordset): the
# client encodes it in C (msgspec) instead of adapting 14 values a row in psycopg2, which
# halves the client CPU per heartbeat.
_INSERT_SQL = f"""
WITH ins AS (
    INSERT INTO heartbeats ({", ".join(COLUMNS)}, extra)
    SELECT {", ".join(COLUMNS)}, extra
    FROM json_populate_recordset(NULL::heartbeats, %(rows)s::json)
    ON CONFLICT DO NOTHING
    RETURNING {", ".join(COLUMNS)}
),
status AS (
    INSERT INTO device_last_status ({", ".join(STATUS_COLUMNS)})
    SELECT DISTINCT ON (device_id) {", ".join(STATUS_COLUMNS)}
    FROM ins
    ORDER BY device_id, received_at DESC, bucket_ts DESC
    ON CONFLICT (device_id) DO UPDATE SET
            {_SET_STATUS}
        WHERE device_last_status.received_at <= EXCLUDED.received_at
)
SELECT device_id, (extract(epoch FROM bucket_ts) * 1000000)::bigint FROM ins
"""
_encoder = msgspec.json.Encoder()
PREPARED_NAME = "nexmdm_insert_heartbeats"
_EXECUTE_PREPARED = f"EXECUTE {PREPARED_NAME}(%(rows)s)"


def prepare_insert(dbapi_conn: DBAPIConnection) -> None:
    """PREPARE the insert statement on a connection that will run it many times: the CTE is
    then planned once per connection instead of once per batch. Caller commits, unless the
    connection is in autocommit."""
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(f"PREPARE {PREPARED_NAME}(json) AS " + _INSERT_SQL.replace("%(rows)s::json", "$1"))
    finally:
        cursor.close()


def _payload(rows: list[HeartbeatRow]) -> str:
    return _encoder.encode(rows).decode()


def insert_heartbeats(
    conn: Connection | DBAPIConnection, rows: list[HeartbeatRow], *, prepared: bool = False
) -> list[bool]:
    """Store heartbeats and move device_last_status to the one that arrived last, in one statement.

    By the server's receive time, not the device's clock: one heartbeat from a clock far ahead
    must not hide the device's correct ones that follow (its bucket lies in the future).

    Returns, per row, True when it was stored and False when it duplicates a stored one (the
    same device and bucket, earlier or in this same batch). Caller commits.
    Rows are sorted by device so concurrent batches lock status rows in one order.
    ``conn`` is a SQLAlchemy Connection, or a DBAPI connection for the group-commit writer,
    which keeps one of its own and skips SQLAlchemy's per-execution bookkeeping;
    ``prepared=True`` runs the statement PREPAREd on it by ``prepare_insert``.
    """
    if not rows:
        return []
    ordered = sorted(rows, key=lambda r: (r.device_id, r.bucket_ts))
    params = {"rows": _payload(ordered)}
    if isinstance(conn, Connection):
        fetched = conn.exec_driver_sql(_INSERT_SQL, params).fetchall()
    else:
        cursor = conn.cursor()
        try:
            cursor.execute(_EXECUTE_PREPARED if prepared else _INSERT_SQL, params)
            fetched = cursor.fetchall()
        finally:
            cursor.close()
    stored_keys = {(device_id, bucket_us) for device_id, bucket_us in fetched}
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
    conn: Connection, device_id: int, since: datetime, until: datetime, limit: int, newest_first: bool = True
) -> list[dict[str, Any]]:
    """A device's heartbeats in PostgreSQL with since <= bucket_ts < until, newest (or oldest) first.

    The range arrives as constants in the SQL text (psycopg2 interpolates client-side), so the
    planner prunes to the partitions in range.
    """
    result = conn.exec_driver_sql(
        f"""
        SELECT {", ".join(COLUMNS)}, extra FROM heartbeats
        WHERE device_id = %(id)s AND bucket_ts >= %(since)s AND bucket_ts < %(until)s
        ORDER BY bucket_ts {"DESC" if newest_first else "ASC"}
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
