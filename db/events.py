"""Device events: their daily partitions, the set-based statement that derives them, and reads.

An event is a change of a device's row in device_event_state (what the events job saw last
time) against the fleet as it is now (devices + device_last_status). One statement finds every
change of the whole fleet, inserts one event per transition and moves the state rows forward,
so each transition is recorded exactly once: the job runs under an advisory lock, and the
events and the new state commit together.

Every function takes the connection first and never commits: the caller owns the transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Connection

from db.paging import Conditions, keyset_page
from db.partitions import list_partitions, lock_partition_ddl

EVENT_TYPES = (
    "device_offline", "device_online", "battery_low", "battery_critical", "app_version_changed", "token_revoked",
)
EVENT_PARTITION_RE = re.compile(r"^events_p(\d{8})$")


@dataclass(frozen=True)
class Thresholds:
    """When a device counts as offline, and its battery bands (with hysteresis)."""

    offline_after_s: int = 180
    battery_low_pct: int = 20
    battery_critical_pct: int = 10
    battery_hysteresis_pct: int = 5


@dataclass(frozen=True)
class DerivedEvents:
    """What one derivation did: events recorded by type, and state rows written."""

    by_type: dict[str, int] = field(default_factory=dict)
    state_rows: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_type.values())


# --- partitions -------------------------------------------------------------------------------


def event_partition_name(day: date) -> str:
    """``events_pYYYYMMDD`` for a UTC day."""
    return f"events_p{day:%Y%m%d}"


def event_partition_day(name: str) -> date | None:
    """The day an events partition stands for, or None when the name is not one of ours."""
    match = EVENT_PARTITION_RE.match(name)
    return datetime.strptime(match.group(1), "%Y%m%d").date() if match else None


def plan_event_partitions(
    existing: set[str], today: date, premake_days: int, retention_days: int | None
) -> tuple[list[date], list[str]]:
    """Days to create (today and ``premake_days`` ahead) and partitions to drop (days older than
    ``retention_days`` before today; None drops none). Pure."""
    wanted = [today + timedelta(days=i) for i in range(premake_days + 1)]
    create = [d for d in wanted if event_partition_name(d) not in existing]
    if retention_days is None:
        return create, []
    oldest_kept = today - timedelta(days=retention_days)
    drop = sorted(n for n in existing if (d := event_partition_day(n)) is not None and d < oldest_kept)
    return create, drop


def list_event_partitions(conn: Connection) -> set[str]:
    """Names of the partitions attached to events."""
    return list_partitions(conn, "events")


def maintain_event_partitions(
    conn: Connection, today: date, premake_days: int, retention_days: int | None
) -> tuple[list[str], list[str]]:
    """Converge on "today and the next days exist, none is past retention" (``None``: drop
    nothing). Idempotent; serialised with every other partition DDL. Returns (created, dropped)."""
    lock_partition_ddl(conn)  # the heartbeats partitions' lock: one partition maker at a time
    create, drop = plan_event_partitions(list_event_partitions(conn), today, premake_days, retention_days)
    for day in create:
        start = datetime.combine(day, time(0), tzinfo=UTC)
        conn.exec_driver_sql(
            f"CREATE TABLE IF NOT EXISTS {event_partition_name(day)} PARTITION OF events "
            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{(start + timedelta(days=1)).isoformat()}')"
        )
    for name in drop:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
    return [event_partition_name(d) for d in create], drop


# --- derivation -------------------------------------------------------------------------------

# The fleet now against what the job saw last time, one row per device. A device with no state
# row (enrolled since) counts as never seen. The battery band keeps its old value until the
# level is HYSTERESIS past the threshold on the way up; on the way down it changes at once.
_CHANGES = """
WITH cur AS (
    SELECT d.id AS device_id,
           d.revoked_at IS NOT NULL AS revoked,
           s.device_id IS NOT NULL AS seen,
           s.received_at, s.battery_pct, s.app_version AS version,
           st.device_id IS NOT NULL AS has_state,
           st.online AS was_online, st.battery_band AS old_band, st.app_version AS old_version,
           COALESCE(st.revoked, false) AS was_revoked
    FROM devices d
    LEFT JOIN device_last_status s ON s.device_id = d.id
    LEFT JOIN device_event_state st ON st.device_id = d.id
),
nxt AS (
    SELECT cur.*,
           CASE WHEN seen THEN received_at >= %(now)s - make_interval(secs => %(offline_after)s) END AS online,
           CASE WHEN NOT seen THEN old_band
                WHEN battery_pct < %(critical)s THEN 'critical'
                WHEN old_band = 'critical' AND battery_pct < %(critical)s + %(hysteresis)s THEN 'critical'
                WHEN battery_pct < %(low)s THEN 'low'
                WHEN old_band IN ('low', 'critical') AND battery_pct < %(low)s + %(hysteresis)s THEN 'low'
                ELSE 'ok' END AS band
    FROM cur
),
changed AS MATERIALIZED (
    SELECT * FROM nxt
    WHERE NOT has_state
       OR online IS DISTINCT FROM was_online
       OR band IS DISTINCT FROM old_band
       OR (seen AND version IS DISTINCT FROM old_version)
       OR revoked <> was_revoked
)
"""

_DERIVE = _CHANGES + """,
recorded AS (
    INSERT INTO events (occurred_at, type, device_id, detail)
    SELECT %(now)s, e.type, c.device_id, e.detail
    FROM changed c
    CROSS JOIN LATERAL (VALUES
        (1, 'token_revoked', c.revoked AND NOT c.was_revoked, '{}'::jsonb),
        (2, 'device_offline', c.was_online AND c.online = false AND NOT c.revoked,
            jsonb_build_object('last_seen_at', c.received_at, 'offline_after_s', %(offline_after)s)),
        (3, 'device_online', c.online AND c.was_online IS DISTINCT FROM true,
            jsonb_build_object('last_seen_at', c.received_at, 'first_seen', c.was_online IS NULL)),
        (4, 'battery_low', c.band = 'low' AND (c.old_band IS NULL OR c.old_band = 'ok'),
            jsonb_build_object('battery_pct', c.battery_pct, 'threshold_pct', %(low)s)),
        (5, 'battery_critical', c.band = 'critical' AND c.old_band IS DISTINCT FROM 'critical',
            jsonb_build_object('battery_pct', c.battery_pct, 'threshold_pct', %(critical)s)),
        (6, 'app_version_changed', c.seen AND c.old_version IS NOT NULL AND c.version <> c.old_version,
            jsonb_build_object('from', c.old_version, 'to', c.version))
    ) AS e(ord, type, fire, detail)
    WHERE e.fire
    ORDER BY c.device_id, e.ord
    RETURNING type
),
saved AS (
    INSERT INTO device_event_state AS st (device_id, online, battery_band, app_version, revoked, changed_at)
    SELECT device_id, online, band, COALESCE(version, old_version), revoked, %(now)s FROM changed
    ORDER BY device_id
    ON CONFLICT (device_id) DO UPDATE SET online = EXCLUDED.online, battery_band = EXCLUDED.battery_band,
        app_version = EXCLUDED.app_version, revoked = EXCLUDED.revoked, changed_at = EXCLUDED.changed_at
    RETURNING 1
)
SELECT NULL::text AS type, count(*) AS n FROM saved
UNION ALL
SELECT type, count(*) FROM recorded GROUP BY type
"""


def _params(thresholds: Thresholds, now: datetime) -> dict[str, Any]:
    return {"now": now, "offline_after": thresholds.offline_after_s, "low": thresholds.battery_low_pct,
            "critical": thresholds.battery_critical_pct, "hysteresis": thresholds.battery_hysteresis_pct}


def derive_events(conn: Connection, thresholds: Thresholds, now: datetime) -> DerivedEvents:
    """Record every transition of the fleet since the last derivation, in one statement, as of
    ``now``; idempotent (a second call at the same time records nothing). Caller commits, and
    must hold the events job's lock (event ids then grow in commit order)."""
    rows = conn.exec_driver_sql(_DERIVE, _params(thresholds, now)).fetchall()
    state_rows = next((n for t, n in rows if t is None), 0)
    return DerivedEvents(by_type={t: n for t, n in rows if t is not None}, state_rows=state_rows)


def count_pending_changes(conn: Connection, thresholds: Thresholds, now: datetime) -> int:
    """How many devices the next derivation would touch, read-only."""
    return conn.exec_driver_sql(_CHANGES + "SELECT count(*) FROM changed", _params(thresholds, now)).scalar_one()


# --- reads ------------------------------------------------------------------------------------

_EVENT_FIELDS = "id, type, device_id, occurred_at, detail"


@dataclass(frozen=True)
class EventFilter:
    """Filters of the event log. None means "any"."""

    types: tuple[str, ...] = ()
    device_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None


def list_events(
    conn: Connection, flt: EventFilter, *, after: int | None = None, before: int | None = None, limit: int = 100
) -> tuple[list[dict[str, Any]], int | None]:
    """One page of events by id (keyset): oldest first after ``after``, or newest first before
    ``before`` when given. Returns the rows and the cursor of the next page (None on the last)."""
    where = Conditions(limit=limit + 1)
    if flt.types:
        where.add("type = ANY(%(types)s)", types=list(flt.types))
    if flt.device_id is not None:
        where.add("device_id = %(device_id)s", device_id=flt.device_id)
    if flt.since is not None:
        where.add("occurred_at >= %(since)s", since=flt.since)
    if flt.until is not None:
        where.add("occurred_at < %(until)s", until=flt.until)
    if before is not None:
        where.add("id < %(before)s", before=before)
        if after:  # both: the ids between them, newest first
            where.add("id > %(after)s", after=after)
        order = "DESC"
    else:
        where.add("id > %(after)s", after=after or 0)
        order = "ASC"
    rows = conn.exec_driver_sql(
        f"SELECT {_EVENT_FIELDS} FROM events WHERE {where.sql()} ORDER BY id {order} LIMIT %(limit)s",
        where.params,
    ).fetchall()
    return keyset_page(rows, limit)


def latest_event_id(conn: Connection) -> int:
    """The id of the newest event (0 when there is none)."""
    return conn.exec_driver_sql("SELECT COALESCE(max(id), 0) FROM events").scalar_one()


__all__ = [
    "EVENT_TYPES",
    "DerivedEvents",
    "EventFilter",
    "Thresholds",
    "count_pending_changes",
    "derive_events",
    "event_partition_name",
    "latest_event_id",
    "list_event_partitions",
    "list_events",
    "maintain_event_partitions",
    "plan_event_partitions",
]
