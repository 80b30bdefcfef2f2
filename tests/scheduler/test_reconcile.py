"""reconcile heals device_last_status drift, set-based, fast at fleet scale."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from db.heartbeats import insert_heartbeats
from scheduler.jobs.reconcile import count_drift, heal_last_status
from scheduler.service import run_job
from tests.support.jobdata import make_devices, row, scalar


def test_reconcile_heals_deliberately_created_drift(engine, settings):
    devices = make_devices(engine, 6)
    now = datetime.now(UTC).replace(microsecond=0)
    with engine.begin() as conn:
        insert_heartbeats(conn, [row(d, now - timedelta(minutes=m), battery=m) for d in devices for m in (1, 2, 3)])
        # Drift: two status rows gone, two moved back in time; two devices stay healthy.
        conn.exec_driver_sql("DELETE FROM device_last_status WHERE device_id IN (%(a)s, %(b)s)",
                             {"a": devices[0], "b": devices[1]})
        conn.exec_driver_sql(
            "UPDATE device_last_status SET bucket_ts = bucket_ts - interval '1 hour', "
            "received_at = received_at - interval '1 hour', battery_pct = 99 "
            "WHERE device_id IN (%(a)s, %(b)s)", {"a": devices[2], "b": devices[3]})
        assert count_drift(conn).missing == 2 and count_drift(conn).stale == 2

    report = run_job("reconcile", engine, settings, progress=lambda line: None)
    assert report.status == "succeeded"
    assert (report.rows_affected, report.detail["inserted"], report.detail["updated"]) == (4, 2, 2)
    assert scalar(engine, "SELECT count(*) FROM device_last_status WHERE battery_pct = 1") == 6
    assert scalar(engine, "SELECT count(*) FROM device_last_status ds JOIN LATERAL (SELECT max(bucket_ts) m "
                          "FROM heartbeats h WHERE h.device_id = ds.device_id) x ON x.m = ds.bucket_ts") == 6
    again = run_job("reconcile", engine, settings, progress=lambda line: None)
    assert again.rows_affected == 0


def test_reconcile_of_100k_devices_takes_seconds(engine, settings):
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO devices (device_uid, token_hash) "
            "SELECT 'scale-' || i, sha256(('t' || i)::bytea) FROM generate_series(1, 100000) i")
        for minutes_ago in (2, 1):
            conn.exec_driver_sql(
                """
                INSERT INTO heartbeats (device_id, bucket_ts, sent_at, received_at, clock_skew_s, battery_pct,
                    charging, network_type, app_version, os_version, uptime_s, free_storage_mb)
                SELECT id, %(ts)s, %(ts)s, %(ts)s, 0, 50, false, 'wifi', '1.0.0', '14', 1, 1 FROM devices
                """, {"ts": now - timedelta(minutes=minutes_ago)})
        conn.exec_driver_sql(
            "INSERT INTO device_last_status SELECT device_id, bucket_ts, sent_at, received_at, clock_skew_s, "
            "battery_pct, charging, network_type, signal_dbm, app_version, os_version, uptime_s, free_storage_mb "
            "FROM heartbeats WHERE bucket_ts = %(ts)s AND device_id %% 10 <> 0", {"ts": now - timedelta(minutes=2)})
        conn.exec_driver_sql("ANALYZE devices, heartbeats, device_last_status")
    started = time.perf_counter()
    with engine.begin() as conn:
        healed = heal_last_status(conn)
    took_s = time.perf_counter() - started
    print(f"reconcile of 100,000 devices: {healed.total} healed in {took_s:.2f} s")
    assert (healed.missing, healed.stale) == (10_000, 90_000)
    assert took_s < 20, took_s
    started = time.perf_counter()
    with engine.begin() as conn:
        assert heal_last_status(conn).total == 0
    print(f"reconcile of 100,000 healthy devices: {time.perf_counter() - started:.2f} s")
