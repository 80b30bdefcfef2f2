"""Fleet reads: one device's status, the filtered fleet list, the fleet summary.

``from_heartbeats=False`` (the default, READ_FROM_LAST_STATUS=true) reads device_last_status,
one row per device. ``from_heartbeats=True`` answers the same from the heartbeats table — the
fallback before device_last_status has been backfilled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from db.errors import DeviceNotFound
from db.heartbeats import STATUS_COLUMNS
from db.paging import Conditions, keyset_page

# A device's status: the heartbeat columns (received_at named last_seen_at), and whether it is online.
_STATUS_FIELDS = ", ".join(
    ["s.received_at AS last_seen_at", *(f"s.{c}" for c in STATUS_COLUMNS if c not in ("device_id", "received_at")),
     "COALESCE(s.received_at >= now() - make_interval(secs => %(offline_after)s), false) AS online"]
)
_FROM_LAST_STATUS = "devices d LEFT JOIN device_last_status s ON s.device_id = d.id"
_FROM_HEARTBEATS = """devices d LEFT JOIN LATERAL (
    SELECT * FROM heartbeats h WHERE h.device_id = d.id ORDER BY h.bucket_ts DESC LIMIT 1
) s ON true"""
_DEVICE_FIELDS = "d.id, d.device_uid, d.name, d.labels, d.enrolled_at, d.revoked_at"

BATTERY_BANDS = (("critical", 0, 10), ("low", 10, 20), ("medium", 20, 50), ("high", 50, 101))


def _source(from_heartbeats: bool) -> str:
    return _FROM_HEARTBEATS if from_heartbeats else _FROM_LAST_STATUS


def get_device_status(
    conn: Connection, device_id: int, *, offline_after_s: int, from_heartbeats: bool = False
) -> dict[str, Any]:
    """The current status of one device; raises DeviceNotFound."""
    row = conn.exec_driver_sql(
        f"SELECT {_DEVICE_FIELDS}, {_STATUS_FIELDS} FROM {_source(from_heartbeats)} WHERE d.id = %(id)s",
        {"id": device_id, "offline_after": offline_after_s},
    ).first()
    if row is None:
        raise DeviceNotFound(device_id)
    return dict(row._mapping)


@dataclass(frozen=True)
class FleetFilter:
    """Filters of the fleet list. None means "any"."""

    status: str | None = None  # "online" | "offline"
    battery_below: int | None = None
    app_version: str | None = None
    label: str | None = None


def list_devices(
    conn: Connection,
    flt: FleetFilter,
    *,
    after_id: int = 0,
    limit: int = 100,
    offline_after_s: int,
    from_heartbeats: bool = False,
) -> tuple[list[dict[str, Any]], int | None]:
    """One page of the fleet, ordered by device id (keyset pagination).

    Returns the rows and the cursor of the next page (None on the last page).
    """
    where = Conditions(after=after_id, limit=limit + 1, offline_after=offline_after_s)
    where.add("d.id > %(after)s")
    cutoff = "now() - make_interval(secs => %(offline_after)s)"
    if flt.status == "online":
        where.add(f"s.received_at >= {cutoff}")
    elif flt.status == "offline":
        where.add(f"(s.received_at IS NULL OR s.received_at < {cutoff})")
    if flt.battery_below is not None:
        where.add("s.battery_pct < %(battery_below)s", battery_below=flt.battery_below)
    if flt.app_version is not None:
        where.add("s.app_version = %(app_version)s", app_version=flt.app_version)
    if flt.label is not None:
        where.add("d.labels @> ARRAY[%(label)s]::text[]", label=flt.label)
    rows = conn.exec_driver_sql(
        f"""
        SELECT {_DEVICE_FIELDS}, {_STATUS_FIELDS}
        FROM {_source(from_heartbeats)}
        WHERE {where.sql()}
        ORDER BY d.id
        LIMIT %(limit)s
        """,
        where.params,
    ).fetchall()
    return keyset_page(rows, limit)


def fleet_summary(conn: Connection, *, offline_after_s: int, from_heartbeats: bool = False) -> dict[str, Any]:
    """Counts for the whole fleet: total, online, offline, never seen, revoked, battery bands
    and app versions (the 50 most common). One scan: the counts come grouped by app version
    and are added up here, so the fleet is read once instead of once per question."""
    bands = ",\n".join(
        f"count(*) FILTER (WHERE s.battery_pct >= {lo} AND s.battery_pct < {hi}) AS battery_{name}"
        for name, lo, hi in BATTERY_BANDS
    )
    rows = conn.exec_driver_sql(
        f"""
        SELECT s.app_version,
               count(*) AS total,
               count(*) FILTER (WHERE s.received_at >= now() - make_interval(secs => %(offline_after)s)) AS online,
               count(*) FILTER (WHERE s.device_id IS NULL) AS never_seen,
               count(*) FILTER (WHERE d.revoked_at IS NOT NULL) AS revoked,
               count(*) FILTER (WHERE s.charging) AS charging,
               count(*) FILTER (WHERE s.received_at < now() - interval '1 hour') AS offline_over_1h,
               count(*) FILTER (WHERE s.received_at < now() - interval '24 hours') AS offline_over_24h,
               {bands}
        FROM {_source(from_heartbeats)}
        GROUP BY s.app_version
        """,
        {"offline_after": offline_after_s},
    ).fetchall()
    counters = ("total", "online", "never_seen", "revoked", "charging", "offline_over_1h", "offline_over_24h",
                *(f"battery_{n}" for n, _, _ in BATTERY_BANDS))
    totals = dict.fromkeys(counters, 0)
    for row in rows:
        for name in counters:
            totals[name] += row._mapping[name]
    versions = sorted(
        ((r.app_version, r.total) for r in rows if r.app_version is not None), key=lambda v: (-v[1], v[0])
    )
    return {
        "total": totals["total"],
        "online": totals["online"],
        "offline": totals["total"] - totals["online"],
        "never_seen": totals["never_seen"],
        "revoked": totals["revoked"],
        "charging": totals["charging"],
        "offline_over_1h": totals["offline_over_1h"],
        "offline_over_24h": totals["offline_over_24h"],
        "battery": {name: totals[f"battery_{name}"] for name, _, _ in BATTERY_BANDS},
        "app_versions": dict(versions[:50]),
    }


def backfill_last_status(conn: Connection) -> int:
    """Build device_last_status from heartbeats, set-based: insert missing rows and move
    stale ones to each device's last-arrived heartbeat. Idempotent; returns how many rows changed. Caller commits."""
    cols = ", ".join(STATUS_COLUMNS)
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in STATUS_COLUMNS[1:])
    result = conn.exec_driver_sql(
        f"""
        INSERT INTO device_last_status ({cols})
        SELECT DISTINCT ON (device_id) {cols} FROM heartbeats ORDER BY device_id, received_at DESC, bucket_ts DESC
        ON CONFLICT (device_id) DO UPDATE SET {sets}
        WHERE device_last_status.received_at < EXCLUDED.received_at
        """
    )
    return result.rowcount
