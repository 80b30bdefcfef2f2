"""The acceptance checks the original system promised: partition pruning, deduplication,
idempotent partition creation, a clear 404 for missing devices, heartbeats outside every
partition. (Reconciliation, archive checksums and concurrent runs: test_reconcile.py,
test_archive.py, test_job_locking.py.)"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from db.heartbeats import explain_history
from db.partitions import list_partitions, partition_name
from scheduler.service import run_job
from tests.support.helpers import bearer, enroll, heartbeat_body
from tests.support.jobdata import fill_day, make_devices, scalar

TODAY = datetime.now(UTC).date()


def test_ranged_history_read_scans_only_the_partitions_in_range(engine):
    devices = make_devices(engine, 2)
    for n in range(1, 6):
        fill_day(engine, TODAY - timedelta(days=n), devices, per_device=1)
    since = datetime(*(TODAY - timedelta(days=3)).timetuple()[:3], tzinfo=UTC)
    until = since + timedelta(days=2)
    with engine.connect() as conn:
        plan = explain_history(conn, devices[0], since, until)
        assert len(list_partitions(conn)) == 13
    scanned = set(re.findall(r"heartbeats_p\d{8}", plan))
    assert scanned == {partition_name(TODAY - timedelta(days=3)), partition_name(TODAY - timedelta(days=2))}, plan


def test_a_retried_heartbeat_is_stored_once(client, admin, engine):
    dev = enroll(client, admin)[0]
    body = heartbeat_body()
    first = client.post("/v1/heartbeat", json=body, headers=bearer(dev["token"])).get_json()
    retry = client.post("/v1/heartbeat", json=body, headers=bearer(dev["token"])).get_json()
    assert (first["status"], retry["status"]) == ("stored", "duplicate")
    assert scalar(engine, "SELECT count(*) FROM heartbeats") == 1


def test_fast_reads_answer_missing_devices_with_404(client, admin):
    for path in ("/v1/devices/987654", "/v1/devices/987654/heartbeats"):
        resp = client.get(path, headers=admin)
        assert resp.status_code == 404 and resp.get_json()["error"] == "device_not_found", path


def test_partition_creation_is_idempotent_and_recorded(engine, settings):
    with engine.begin() as conn:
        for name in list_partitions(conn):
            conn.exec_driver_sql(f"DROP TABLE {name}")
        conn.exec_driver_sql("TRUNCATE hb_partitions")
    first = run_job("partitions", engine, settings, progress=lambda line: None)
    assert first.status == "succeeded" and first.rows_affected == settings.partition_premake_days + 1
    second = run_job("partitions", engine, settings, progress=lambda line: None)
    assert second.status == "succeeded" and second.rows_affected == 0 and second.detail["created"] == []
    assert scalar(engine, "SELECT count(*) FROM hb_partitions WHERE state = 'active'") == 8
    with engine.connect() as conn:
        assert len(list_partitions(conn)) == 8


def test_heartbeat_outside_every_partition_gets_its_day_created(client, admin, engine):
    """No default partition: the writer creates the missing day and stores the heartbeat."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {partition_name(TODAY)}")
    dev = enroll(client, admin)[0]
    resp = client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(dev["token"]))
    assert resp.status_code == 200 and resp.get_json()["status"] == "stored"
    assert scalar(engine, f"SELECT count(*) FROM {partition_name(TODAY)}") == 1


def test_partitions_job_warns_about_a_default_partition(engine, settings):
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE heartbeats_default PARTITION OF heartbeats DEFAULT")
    try:
        report = run_job("partitions", engine, settings, progress=lambda line: None)
        assert report.detail["default_partitions"] == ["heartbeats_default"]
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE heartbeats_default")
