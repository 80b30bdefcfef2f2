"""Heartbeat ingestion against a real PostgreSQL: storage, dedup, atomic dual write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import DBAPIError

from db.heartbeats import HeartbeatRow, insert_heartbeats
from tests.support.helpers import (
    bearer,
    enroll,
    heartbeat_body,
    settings_on_both_heartbeat_paths,  # noqa: F401 (the "settings" fixture: every test on both paths)
)


def count(engine, sql: str) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql(sql).scalar_one()


def test_heartbeat_is_stored_and_updates_last_status(client, admin, engine):
    dev = enroll(client, admin)[0]
    resp = client.post("/v1/heartbeat", json=heartbeat_body(battery_pct=42), headers=bearer(dev["token"]))
    assert resp.status_code == 200, resp.get_json()
    ack = resp.get_json()
    assert ack["status"] == "stored" and ack["device_id"] == dev["id"]
    assert count(engine, "SELECT count(*) FROM heartbeats") == 1
    status = client.get(f"/v1/devices/{dev['id']}", headers=admin).get_json()
    assert status["battery_pct"] == 42 and status["online"] is True


def test_retry_in_same_bucket_is_stored_once(client, admin, engine):
    dev = enroll(client, admin)[0]
    sent = datetime.now(UTC).replace(microsecond=0)
    sent = sent - timedelta(seconds=sent.second % 10)  # start of a 10 s bucket
    first = client.post("/v1/heartbeat", json=heartbeat_body(sent), headers=bearer(dev["token"]))
    retry = client.post("/v1/heartbeat", json=heartbeat_body(sent + timedelta(seconds=3)), headers=bearer(dev["token"]))
    assert first.get_json()["status"] == "stored"
    assert retry.get_json()["status"] == "duplicate"
    assert first.get_json()["bucket_ts"] == retry.get_json()["bucket_ts"]
    assert count(engine, "SELECT count(*) FROM heartbeats") == 1
    later = client.post(
        "/v1/heartbeat", json=heartbeat_body(sent + timedelta(seconds=11)), headers=bearer(dev["token"])
    )
    assert later.get_json()["status"] == "stored"
    assert count(engine, "SELECT count(*) FROM heartbeats") == 2


def test_last_status_follows_what_arrived_last(client, admin, engine):
    # By the server's receive time, not the device's clock (a clock far ahead froze the
    # status: tests/api/test_attacks.py). A retry of an older heartbeat is a
    # duplicate and moves nothing; a distinct heartbeat that arrives last is the device's news.
    dev = enroll(client, admin)[0]
    now = datetime.now(UTC)
    client.post("/v1/heartbeat", json=heartbeat_body(now, battery_pct=50), headers=bearer(dev["token"]))
    retry = client.post("/v1/heartbeat", json=heartbeat_body(now, battery_pct=50), headers=bearer(dev["token"]))
    assert retry.get_json()["status"] == "duplicate"
    late = client.post("/v1/heartbeat", json=heartbeat_body(now - timedelta(seconds=60), battery_pct=90),
                       headers=bearer(dev["token"]))
    assert late.get_json()["status"] == "stored"
    status = client.get(f"/v1/devices/{dev['id']}", headers=admin).get_json()
    assert status["battery_pct"] == 90 and status["online"] is True
    assert count(engine, "SELECT count(*) FROM heartbeats") == 2


def test_clock_skew_beyond_limit_uses_server_time(client, admin):
    dev = enroll(client, admin)[0]
    wrong_clock = datetime(2020, 1, 1, tzinfo=UTC)
    ack = client.post("/v1/heartbeat", json=heartbeat_body(wrong_clock), headers=bearer(dev["token"])).get_json()
    assert ack["skew_corrected"] is True
    assert ack["clock_skew_s"] > 10 ** 8
    assert abs(datetime.fromisoformat(ack["bucket_ts"]) - datetime.now(UTC)) < timedelta(minutes=31)
    retry = client.post("/v1/heartbeat", json=heartbeat_body(wrong_clock), headers=bearer(dev["token"])).get_json()
    assert retry["status"] == "duplicate" and retry["bucket_ts"] == ack["bucket_ts"]


def test_unknown_fields_are_kept_in_extra(client, admin, engine):
    dev = enroll(client, admin)[0]
    client.post("/v1/heartbeat", json=heartbeat_body(imei_hint="x", temps=[30, 31]), headers=bearer(dev["token"]))
    with engine.connect() as conn:
        extra = conn.exec_driver_sql("SELECT extra FROM heartbeats").scalar_one()
    assert extra == {"imei_hint": "x", "temps": [30, 31]}


def _row(device_id: int, ts: datetime) -> HeartbeatRow:
    return HeartbeatRow(device_id, ts, ts, ts, 0.0, 50, False, "wifi", -50, "1.0", "14", 10, 100)


def test_batch_with_same_key_twice_stores_one(engine):
    ts = datetime.now(UTC).replace(microsecond=0)
    with engine.begin() as conn:
        flags = insert_heartbeats(conn, [_row(1, ts), _row(2, ts), _row(1, ts)])
    assert flags == [True, True, False]
    assert count(engine, "SELECT count(*) FROM heartbeats") == 2
    assert count(engine, "SELECT count(*) FROM device_last_status") == 2


def test_dual_write_is_atomic(engine):
    """A failure in the last-status upsert leaves no heartbeat row either."""
    ts = datetime.now(UTC).replace(microsecond=0)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "ALTER TABLE device_last_status ADD CONSTRAINT test_reject CHECK (battery_pct <> 13)"
        )
    try:
        bad = HeartbeatRow(7, ts, ts, ts, 0.0, 13, False, "wifi", -50, "1.0", "14", 10, 100)
        with pytest.raises(DBAPIError):
            with engine.begin() as conn:
                insert_heartbeats(conn, [bad])
        assert count(engine, "SELECT count(*) FROM heartbeats") == 0
        assert count(engine, "SELECT count(*) FROM device_last_status") == 0
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE device_last_status DROP CONSTRAINT test_reject")


def test_missing_partition_is_created_on_demand(engine):
    day = datetime.now(UTC).date() + timedelta(days=20)
    ts = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    from db.ingest import IngestConnection

    connection = IngestConnection(engine, premake_days=7)
    try:
        assert connection.insert([_row(3, ts)]) == [True]
        assert connection.insert([_row(3, ts)]) == [False]  # the retry runs on the same connection
    finally:
        connection.close()
    assert count(engine, f"SELECT count(*) FROM heartbeats_p{day:%Y%m%d}") == 1
    assert engine.pool.checkedout() == 0  # closed: not returned with its PREPAREd statement


def test_missing_partition_through_the_endpoint(client, admin, engine):
    """The app's writer (the production one) creates the missing partition of today, and retries."""
    dev = enroll(client, admin)[0]
    with engine.begin() as conn:  # today's partition gone, as if the partition job never ran
        conn.exec_driver_sql(f"DROP TABLE heartbeats_p{datetime.now(UTC):%Y%m%d}")
    resp = client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(dev["token"]))
    assert resp.status_code == 200 and resp.get_json()["status"] == "stored", resp.get_json()
    assert count(engine, f"SELECT count(*) FROM heartbeats_p{datetime.now(UTC):%Y%m%d}") == 1


def test_prepared_insert_on_a_dbapi_connection_dedups_like_the_plain_one(engine):
    from db.heartbeats import prepare_insert

    ts = datetime.now(UTC).replace(microsecond=0)
    raw = engine.raw_connection()
    try:
        prepare_insert(raw)
        assert insert_heartbeats(raw, [_row(11, ts), _row(12, ts)], prepared=True) == [True, True]
        raw.commit()
        assert insert_heartbeats(raw, [_row(11, ts), _row(13, ts)], prepared=True) == [False, True]
        raw.commit()
    finally:
        raw.invalidate()  # drop the session with its prepared statement
    assert count(engine, "SELECT count(*) FROM heartbeats") == 3
    assert count(engine, "SELECT count(*) FROM device_last_status") == 3
