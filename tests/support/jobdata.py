"""Builders for the job tests: devices and old heartbeats written straight to the database."""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, timedelta

import msgspec
from sqlalchemy import Engine

from db.devices import NewDevice, enroll_devices
from db.heartbeats import HeartbeatRow, insert_heartbeats
from db.partitions import ensure_partitions


def make_devices(engine: Engine, n: int, prefix: str = "job") -> list[int]:
    with engine.begin() as conn:
        return [d.id for d in enroll_devices(conn, [NewDevice(f"{prefix}-{i}", None, ()) for i in range(n)])]


def row(device_id: int, ts: datetime, battery: int = 50, extra: str | None = None) -> HeartbeatRow:
    return HeartbeatRow(
        device_id=device_id, bucket_ts=ts, sent_at=ts, received_at=ts, clock_skew_s=0.0,
        battery_pct=battery, charging=False, network_type="wifi", signal_dbm=-70, app_version="1.0.0",
        os_version="14", uptime_s=100, free_storage_mb=1000,
        extra_json=msgspec.Raw(extra.encode()) if extra is not None else None,
    )


def fill_day(engine: Engine, day: date, device_ids: list[int], per_device: int = 3, noise: bool = False) -> int:
    """Create the day's partition and store ``per_device`` heartbeats per device in it
    (``noise``: a random string in each extra, so the rows do not compress to nothing)."""
    rows = []
    for dev in device_ids:
        for k in range(per_device):
            ts = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(hours=1 + k, seconds=10 * dev)
            extra = f'{{"noise": "{os.urandom(16).hex()}"}}' if noise else '{"note": "tab\\there\\nnewline \\\\ é"}'
            rows.append(row(dev, ts, battery=(dev + k) % 100, extra=extra))
    with engine.begin() as conn:
        ensure_partitions(conn, day, 0)
        insert_heartbeats(conn, rows)
    return len(rows)


def scalar(engine: Engine, sql: str, params: dict | None = None):
    with engine.connect() as conn:
        value = conn.exec_driver_sql(sql, params or {}).scalar()
        conn.rollback()
    return value
