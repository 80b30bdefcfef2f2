"""Fast reads: one device, the fleet list (filters, keyset pagination), the summary, history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg2
import pytest

from db.fleet import backfill_last_status
from db.heartbeats import explain_history
from db.partitions import ensure_partitions
from tests.support.helpers import bearer, enroll, heartbeat_body


@pytest.fixture
def fleet(client, admin, engine):
    """Ten devices: 0-5 reported (battery 10*i, v1 or v2), 6-9 never did; labels on evens."""
    devices = []
    for i in range(10):
        labels = ["even"] if i % 2 == 0 else []
        devices += enroll(client, admin, 1, prefix=f"fleet{i}", labels=labels)
    for i, dev in enumerate(devices[:6]):
        body = heartbeat_body(battery_pct=10 * i, app_version="2.0" if i >= 3 else "1.0", charging=i == 0)
        assert client.post("/v1/heartbeat", json=body, headers=bearer(dev["token"])).status_code == 200
    return devices


def test_device_status_and_unknown_device_404(client, admin, fleet):
    status = client.get(f"/v1/devices/{fleet[2]['id']}", headers=admin).get_json()
    assert status["battery_pct"] == 20 and status["online"] and status["labels"] == ["even"]
    never = client.get(f"/v1/devices/{fleet[8]['id']}", headers=admin).get_json()
    assert never["online"] is False and never["last_seen_at"] is None
    missing = client.get("/v1/devices/424242", headers=admin)
    assert missing.status_code == 404 and missing.get_json()["error"] == "device_not_found"


def test_fleet_filters(client, admin, fleet):
    def ids(query: str) -> list[int]:
        resp = client.get(f"/v1/devices?{query}", headers=admin)
        assert resp.status_code == 200, resp.get_json()
        return [d["id"] for d in resp.get_json()["devices"]]

    all_ids = [d["id"] for d in fleet]
    assert ids("") == all_ids
    assert ids("status=online") == all_ids[:6]
    assert ids("status=offline") == all_ids[6:]
    assert ids("battery_below=25") == all_ids[:3]
    assert ids("app_version=2.0") == all_ids[3:6]
    assert ids("label=even") == all_ids[0::2]
    assert ids("label=even&status=online&battery_below=50") == [all_ids[0], all_ids[2], all_ids[4]]
    assert client.get("/v1/devices?status=sleepy", headers=admin).status_code == 400
    assert client.get("/v1/devices?limit=0", headers=admin).status_code == 400


def test_keyset_pagination_walks_every_device_once(client, admin, fleet):
    seen, after = [], 0
    while True:
        page = client.get(f"/v1/devices?limit=3&after={after}", headers=admin).get_json()
        seen += [d["id"] for d in page["devices"]]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert seen == [d["id"] for d in fleet]


def test_fleet_summary(client, admin, fleet):
    summary = client.get("/v1/fleet/summary", headers=admin).get_json()
    assert summary["total"] == 10 and summary["online"] == 6 and summary["offline"] == 4
    assert summary["never_seen"] == 4 and summary["charging"] == 1
    assert summary["battery"] == {"critical": 1, "low": 1, "medium": 3, "high": 1}
    assert summary["app_versions"] == {"1.0": 3, "2.0": 3}


def test_reads_from_heartbeats_match_last_status(client, admin, app, settings, fleet):
    def snapshot() -> tuple:
        app.extensions["nexmdm"].summary_cache = None
        return (
            client.get("/v1/devices?limit=100", headers=admin).get_json(),
            client.get(f"/v1/devices/{fleet[4]['id']}", headers=admin).get_json(),
            {k: v for k, v in client.get("/v1/fleet/summary", headers=admin).get_json().items() if k != "as_of"},
        )

    fast = snapshot()
    app.extensions["nexmdm"].settings = settings.with_overrides(read_from_last_status=False)
    assert snapshot() == fast


def test_backfill_builds_last_status_from_heartbeats(client, admin, engine, fleet):
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM device_last_status")
    with engine.begin() as conn:
        assert backfill_last_status(conn) == 6
    with engine.begin() as conn:
        assert backfill_last_status(conn) == 0  # idempotent
    assert client.get(f"/v1/devices/{fleet[5]['id']}", headers=admin).get_json()["battery_pct"] == 50


def test_history_reads_a_range(client, admin, engine, fleet):
    dev = fleet[0]
    now = datetime.now(UTC)
    for minutes in (1, 2, 3):
        client.post("/v1/heartbeat", json=heartbeat_body(now - timedelta(minutes=minutes)),
                    headers=bearer(dev["token"]))
    since = (now - timedelta(minutes=2, seconds=30)).isoformat()
    resp = client.get(f"/v1/devices/{dev['id']}/heartbeats", query_string={"since": since}, headers=admin)
    assert resp.status_code == 200
    got = resp.get_json()["heartbeats"]
    assert len(got) == 3  # the fixture's heartbeat + minutes 1 and 2
    assert got == sorted(got, key=lambda h: h["bucket_ts"], reverse=True)
    bad = client.get(f"/v1/devices/{dev['id']}/heartbeats?since=garbage", headers=admin)
    assert bad.status_code == 400
    assert client.get("/v1/devices/424242/heartbeats", headers=admin).status_code == 404


def test_history_plan_touches_only_partitions_in_range(engine):
    today = datetime.now(UTC).date()
    with engine.begin() as conn:
        ensure_partitions(conn, today - timedelta(days=5), 12)
    since = datetime(today.year, today.month, today.day, tzinfo=UTC) - timedelta(days=2)
    until = since + timedelta(days=1, hours=12)
    with engine.connect() as conn:
        plan = explain_history(conn, 1, since, until)
    scanned = {w for w in plan.replace("(", " ").split() if w.startswith("heartbeats_p") and w[12:].isdigit()}
    expected = {f"heartbeats_p{(since + timedelta(days=d)).date():%Y%m%d}" for d in (0, 1)}
    assert scanned == expected, plan


def test_fleet_summary_is_cached_then_refreshed(client, admin, app, settings, fleet):
    first = client.get("/v1/fleet/summary", headers=admin).get_json()
    assert first["never_seen"] == 4
    client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(fleet[9]["token"]))
    assert client.get("/v1/fleet/summary", headers=admin).get_json() == first  # within the TTL
    app.extensions["nexmdm"].settings = settings.with_overrides(summary_cache_ttl_s=0)
    refreshed = client.get("/v1/fleet/summary", headers=admin).get_json()
    assert refreshed["never_seen"] == 3 and refreshed["as_of"] > first["as_of"]


def test_a_read_is_one_round_trip_and_leaves_no_autocommit_behind(engine):
    """``db.engine.reading`` runs the query alone (autocommit) and hands the connection back
    without a ``SET default_transaction_isolation`` round trip (SQLAlchemy's isolation-level
    reset sent one after every read); the pooled connection is transactional again after."""
    from db.engine import reading

    for _ in range(2):  # the second read finds the connection as the first one left it
        with reading(engine) as conn:
            driver = conn.connection.dbapi_connection
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    assert driver.autocommit is False
    observer = psycopg2.connect(engine.url.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        with observer.cursor() as cur:
            cur.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,))
            (last,) = cur.fetchone()
    finally:
        observer.close()
    assert last == "SELECT pg_backend_pid()"
