"""The events job: each transition recorded once, with battery hysteresis; the event log reads;
the fleet summary's long-offline counts; the events partitions and their retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from msgspec.structs import replace

from db.devices import revoke_device
from db.events import event_partition_name, list_event_partitions, plan_event_partitions
from db.heartbeats import insert_heartbeats
from db.partitions import ensure_partitions
from scheduler.service import run_job
from tests.support.jobdata import make_devices, row, scalar

QUIET = {"progress": lambda line: None}


def beat(engine, device_id: int, at: datetime, battery: int = 50, version: str = "1.0.0") -> None:
    with engine.begin() as conn:
        insert_heartbeats(conn, [replace(row(device_id, at, battery=battery), app_version=version)])


def events_of(engine, device_id: int | None = None) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT type, device_id FROM events WHERE %(d)s::bigint IS NULL OR device_id = %(d)s ORDER BY id",
            {"d": device_id}).fetchall()
        conn.rollback()
    return [(r[0], r[1]) for r in rows]


def derive(engine, settings, now: datetime):
    report = run_job("events", engine, settings, now=now, **QUIET)
    assert report.status == "succeeded", report
    return report


def test_presence_transitions_are_recorded_once(engine, settings):
    a, b, never = make_devices(engine, 3)
    t0 = datetime.now(UTC).replace(microsecond=0)
    beat(engine, a, t0)
    beat(engine, b, t0)
    first = derive(engine, settings, t0)
    assert first.detail["events"] == {"device_online": 2}
    assert derive(engine, settings, t0 + timedelta(seconds=30)).rows_affected == 0  # nothing changed: nothing new

    # b keeps reporting; a goes quiet for longer than OFFLINE_AFTER_SECONDS (180).
    beat(engine, b, t0 + timedelta(seconds=170))
    derive(engine, settings, t0 + timedelta(seconds=200))
    assert events_of(engine)[2:] == [("device_offline", a)]
    assert derive(engine, settings, t0 + timedelta(seconds=230)).rows_affected == 0  # still offline: once
    beat(engine, a, t0 + timedelta(seconds=240))
    derive(engine, settings, t0 + timedelta(seconds=250))
    assert events_of(engine, a) == [("device_online", a), ("device_offline", a), ("device_online", a)]
    assert events_of(engine, never) == []
    detail = scalar(engine, "SELECT detail FROM events WHERE type = 'device_offline'")
    assert detail["offline_after_s"] == 180 and detail["last_seen_at"].startswith(t0.strftime("%Y-%m-%dT%H:%M"))


def test_battery_bands_have_hysteresis(engine, settings):
    (dev,) = make_devices(engine, 1)
    t0 = datetime.now(UTC).replace(microsecond=0)
    fired = []
    # low 20, critical 10, hysteresis 5: down at once, back up only 5 points past a threshold.
    for i, (pct, expected) in enumerate([
        (50, None), (19, "battery_low"), (18, None), (21, None), (19, None), (24, None), (26, None),
        (19, "battery_low"), (9, "battery_critical"), (12, None), (9, None), (14, None), (16, None),
        (9, "battery_critical"), (40, None), (5, "battery_critical"),
    ]):
        at = t0 + timedelta(seconds=10 * i)
        beat(engine, dev, at, battery=pct)
        report = derive(engine, settings, at)
        got = [t for t in report.detail["events"] if t.startswith("battery")]
        assert got == ([expected] if expected else []), (pct, got)
        fired += got
    assert [t for t, _ in events_of(engine) if t.startswith("battery")] == fired


def test_app_version_and_revocation_events(engine, settings):
    a, b = make_devices(engine, 2)
    t0 = datetime.now(UTC).replace(microsecond=0)
    for dev in (a, b):
        beat(engine, dev, t0)
    derive(engine, settings, t0)
    beat(engine, a, t0 + timedelta(seconds=10), version="1.1.0")
    with engine.begin() as conn:
        revoke_device(conn, b)
    derive(engine, settings, t0 + timedelta(seconds=20))
    assert scalar(engine, "SELECT detail FROM events WHERE type = 'app_version_changed'") == {"from": "1.0.0",
                                                                                             "to": "1.1.0"}
    assert events_of(engine, b) == [("device_online", b), ("token_revoked", b)]
    # A revoked device falls silent (its token is refused): that is not an outage to report.
    derive(engine, settings, t0 + timedelta(hours=1))
    assert events_of(engine, b) == [("device_online", b), ("token_revoked", b)]
    assert events_of(engine, a)[-1] == ("device_offline", a)


def test_event_log_reads_filter_and_paginate(engine, settings, client, admin):
    devices = make_devices(engine, 5)
    t0 = datetime.now(UTC).replace(microsecond=0)
    for dev in devices:
        beat(engine, dev, t0)
    derive(engine, settings, t0)
    derive(engine, settings, t0 + timedelta(minutes=5))  # all five offline

    page = client.get("/v1/events?limit=3", headers=admin).get_json()
    assert [e["type"] for e in page["events"]] == ["device_online"] * 3 and page["next_after"] is not None
    ids = [e["id"] for e in page["events"]]
    while page["next_after"] is not None:
        page = client.get(f"/v1/events?limit=3&after={page['next_after']}", headers=admin).get_json()
        ids += [e["id"] for e in page["events"]]
    assert len(ids) == 10 and ids == sorted(ids)

    newest = client.get("/v1/events?order=desc&limit=4", headers=admin).get_json()
    assert [e["id"] for e in newest["events"]] == sorted(ids, reverse=True)[:4]
    older = client.get(f"/v1/events?before={newest['next_before']}&limit=100", headers=admin).get_json()
    assert [e["id"] for e in older["events"]] == sorted(ids, reverse=True)[4:] and older["next_before"] is None

    offline = client.get("/v1/events?type=device_offline", headers=admin).get_json()["events"]
    assert {e["device_id"] for e in offline} == set(devices)
    one = client.get(f"/v1/devices/{devices[0]}/events", headers=admin).get_json()["events"]
    assert [e["type"] for e in one] == ["device_online", "device_offline"]
    assert client.get(f"/v1/events?device_id={devices[1]}&type=device_online", headers=admin).get_json()[
        "events"][0]["device_id"] == devices[1]
    since = (t0 + timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    assert len(client.get(f"/v1/events?since={since}", headers=admin).get_json()["events"]) == 5

    for bad in ("type=device_exploded", "type=device_online,", "since=yesterday", "after=-1", "limit=0",
                "limit=", "order=up", "order="):
        resp = client.get(f"/v1/events?{bad}", headers=admin)
        assert resp.status_code == 400 and resp.get_json()["error"] == "invalid_parameter", bad
    # Both bounds are a range of ids, newest first (the OpenAPI document cannot forbid the pair).
    everything = client.get("/v1/events?order=desc&limit=1000", headers=admin).get_json()["events"]
    ids = sorted(e["id"] for e in everything)
    ranged = client.get(f"/v1/events?after={ids[0]}&before={ids[-1]}", headers=admin).get_json()["events"]
    assert [e["id"] for e in ranged] == sorted(ids[1:-1], reverse=True)
    assert client.get("/v1/devices/999999/events", headers=admin).status_code == 404
    assert client.get("/v1/events").status_code == 401


def test_fleet_summary_counts_long_offline_devices(engine, client, admin):
    devices = make_devices(engine, 4)
    now = datetime.now(UTC).replace(microsecond=0)
    for dev, ago in zip(devices, (timedelta(0), timedelta(minutes=90), timedelta(hours=30), timedelta(hours=2)),
                        strict=True):
        with engine.begin() as conn:
            ensure_partitions(conn, (now - ago).date(), 0)
            insert_heartbeats(conn, [row(dev, now - ago)])  # fills device_last_status too
    summary = client.get("/v1/fleet/summary", headers=admin).get_json()
    assert (summary["offline_over_1h"], summary["offline_over_24h"]) == (3, 1)


def test_partitions_job_keeps_event_days_ahead_and_drops_past_retention(engine, settings):
    today = datetime.now(UTC).date()
    old_day, kept_day = today - timedelta(days=settings.events_retention_days + 1), today - timedelta(days=2)
    with engine.begin() as conn:
        for day in (old_day, kept_day):
            conn.exec_driver_sql(
                f"CREATE TABLE {event_partition_name(day)} PARTITION OF events FOR VALUES FROM "
                f"('{day.isoformat()}T00:00:00+00:00') TO ('{(day + timedelta(days=1)).isoformat()}T00:00:00+00:00')")
        conn.exec_driver_sql(f"DROP TABLE {event_partition_name(today + timedelta(days=7))}")
    report = run_job("partitions", engine, settings, **QUIET)
    assert report.status == "succeeded"
    assert report.detail["events_dropped"] == [event_partition_name(old_day)]
    assert report.detail["events_created"] == [event_partition_name(today + timedelta(days=7))]
    with engine.connect() as conn:
        names = list_event_partitions(conn)
    assert event_partition_name(kept_day) in names and event_partition_name(old_day) not in names
    assert run_job("partitions", engine, settings, **QUIET).detail["events_dropped"] == []


def test_event_partition_plan_is_pure():
    today = datetime(2026, 12, 1, tzinfo=UTC).date()
    existing = {"events_p20261101", "events_p20261102", "events_p20261201", "heartbeats_p20200101", "events_pX"}
    create, drop = plan_event_partitions(existing, today, 2, 29)
    assert [d.isoformat() for d in create] == ["2026-12-02", "2026-12-03"]
    assert drop == ["events_p20261101"]


def test_recorded_events_are_counted_for_prometheus(engine, settings):
    from prometheus_client import REGISTRY

    from api.metrics import JobMetrics, initialize_series

    initialize_series()
    job_metrics = JobMetrics()  # as the app's: each run's report handed to it

    def counted(kind: str) -> float:
        return REGISTRY.get_sample_value("nexmdm_events_recorded_total", {"type": kind})

    before = counted("device_online"), counted("device_offline")
    devices = make_devices(engine, 3)
    t0 = datetime.now(UTC).replace(microsecond=0)
    for dev in devices:
        beat(engine, dev, t0)
    for now in (t0, t0 + timedelta(minutes=5)):
        run_job("events", engine, settings, now=now, on_report=job_metrics.observe_report, **QUIET)
    assert (counted("device_online") - before[0], counted("device_offline") - before[1]) == (3, 3)
    assert counted("token_revoked") is not None  # every type exists before its first event
