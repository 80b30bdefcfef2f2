"""Webhooks: the API, and deliveries to a real HTTP receiver on 127.0.0.1 that fails, times out
and recovers — nothing lost, duplicates only by idempotency key, each device's events in order,
every request signed, backoff doubling, given up after a day."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from db.heartbeats import insert_heartbeats
from scheduler.jobs.webhooks import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SendResult,
    WebhookDispatcher,
    verify,
)
from scheduler.service import run_job
from tests.support.jobdata import make_devices, row, scalar
from tests.support.receiver import FAIL, HANG, Receiver


class Clock:
    """The dispatcher's clock, moved by the test (backoff without sleeping)."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, **delta: float) -> None:
        self.at += timedelta(**delta)


@pytest.fixture
def receiver():
    started = Receiver(hang_s=1.0).start()
    yield started
    started.stop()


def beat_all(engine, devices: list[int], at: datetime) -> None:
    with engine.begin() as conn:
        insert_heartbeats(conn, [row(d, at) for d in devices])


def derive(engine, settings, at: datetime) -> dict:
    report = run_job("events", engine, settings, now=at, progress=lambda line: None)
    assert report.status == "succeeded"
    return report.detail["events"]


def register(client, admin, url: str, **extra) -> dict:
    resp = client.post("/v1/webhooks", json={"url": url, **extra}, headers=admin)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def db_event_ids(engine) -> list[int]:
    with engine.connect() as conn:
        ids = [r[0] for r in conn.exec_driver_sql("SELECT id FROM events ORDER BY id")]
        conn.rollback()
    return ids


def test_webhook_api(client, admin):
    created = register(client, admin, "http://127.0.0.1:9/hook", event_types=["device_offline", "device_online"])
    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 30
    assert created["event_types"] == ["device_offline", "device_online"]
    own = register(client, admin, "https://example.invalid/x", secret="s" * 16)
    assert own["secret"] == "s" * 16 and own["event_types"] == []
    listed = client.get("/v1/webhooks", headers=admin).get_json()["webhooks"]
    assert [w["id"] for w in listed] == [created["id"], own["id"]]
    assert all("secret" not in w and w["pending_deliveries"] == 0 for w in listed)
    for bad in ({"url": "ftp://x.example/a"}, {"url": "http://127.0.0.1/h", "event_types": ["device_exploded"]},
                {"url": "http://127.0.0.1/h", "secret": "short"}, {"url": "http://127.0.0.1/h", "extra": 1}):
        resp = client.post("/v1/webhooks", json=bad, headers=admin)
        assert resp.status_code == 422 and resp.get_json()["error"] == "validation_failed", bad
    deleted = client.delete(f"/v1/webhooks/{created['id']}", headers=admin)
    assert deleted.status_code == 200 and deleted.get_json()["id"] == created["id"]
    assert client.delete(f"/v1/webhooks/{created['id']}", headers=admin).status_code == 404
    assert [w["id"] for w in client.get("/v1/webhooks", headers=admin).get_json()["webhooks"]] == [own["id"]]
    log = client.get(f"/v1/webhooks/{own['id']}/deliveries", headers=admin)
    assert log.status_code == 200 and log.get_json() == {"deliveries": [], "next_before": None}
    # A deleted webhook is gone from the API, its delivery log too (schemathesis' use-after-free
    # check); the rows stay in webhook_deliveries until the nightly prune.
    assert client.get(f"/v1/webhooks/{created['id']}/deliveries", headers=admin).status_code == 404
    assert client.get("/v1/webhooks/424242/deliveries", headers=admin).status_code == 404
    assert client.get(f"/v1/webhooks/{own['id']}/deliveries?status=lost", headers=admin).status_code == 400
    assert client.post("/v1/webhooks", json={"url": "http://127.0.0.1/h"}).status_code == 401


def test_receiver_that_fails_then_times_out_then_recovers_loses_nothing(engine, settings, client, admin, receiver):
    webhook_settings = settings.with_overrides(webhook_batch_max=8, webhook_timeout_s=0.3)
    hook = register(client, admin, receiver.url)
    receiver.script[:] = [FAIL, FAIL, HANG, HANG]
    devices = make_devices(engine, 20)
    t0 = datetime.now(UTC).replace(microsecond=0)
    clock = Clock(t0)
    dispatcher = WebhookDispatcher(engine, webhook_settings, clock=clock)

    beat_all(engine, devices, t0)
    assert derive(engine, settings, t0) == {"device_online": 20}
    first = dispatcher.run_once()
    assert (first.enqueued, first.delivered, first.failed_attempts) == (3, 0, 1)  # 8 + 8 + 4, head failed
    # Backoff: the head waits 1 s, and the batches behind it wait with it.
    assert scalar(engine, "SELECT min(next_attempt_at) FILTER (WHERE attempts = 1) FROM webhook_deliveries") == \
        t0 + timedelta(seconds=1)
    assert dispatcher.run_once().failed_attempts == 0 and len(receiver.received) == 1  # not due yet
    clock.advance(seconds=1)
    assert dispatcher.run_once().failed_attempts == 1  # second 500
    assert scalar(engine, "SELECT min(next_attempt_at) FILTER (WHERE attempts = 2) FROM webhook_deliveries") == \
        clock.at + timedelta(seconds=2)

    # Meanwhile: a carrier outage (all 20 silent), then half of them come back.
    assert derive(engine, settings, t0 + timedelta(seconds=200)) == {"device_offline": 20}
    beat_all(engine, devices[:10], t0 + timedelta(seconds=300))
    assert derive(engine, settings, t0 + timedelta(seconds=310)) == {"device_online": 10}
    for _ in range(20):
        clock.advance(minutes=5)
        dispatcher.run_once()
        if scalar(engine, "SELECT count(*) FROM webhook_deliveries WHERE status <> 'delivered'") == 0:
            break
    assert scalar(engine, "SELECT count(*) FROM webhook_deliveries WHERE status <> 'delivered'") == 0

    accepted = [r for r in receiver.received if r.accepted]
    # Nothing lost: every event reached the receiver in an accepted request.
    received_ids = {e["id"] for r in accepted for e in r.payload["events"]}
    assert received_ids == set(db_event_ids(engine)) and len(received_ids) == 50
    # Duplicates only as at-least-once allows: the two hung requests came again, same key, same body.
    by_key = defaultdict(list)
    for r in accepted:
        by_key[r.key].append(r.body)
    assert sorted(len(bodies) for bodies in by_key.values() if len(bodies) > 1) == [3]
    assert all(len(set(bodies)) == 1 for bodies in by_key.values())
    assert sum(len(set(bodies)) for bodies in by_key.values()) == len(by_key)
    assert all(r.payload["idempotency_key"] == r.key for r in receiver.received)
    # In order: first receipts, in the order received, carry ever larger event ids ...
    seen: set[int] = set()
    order = []
    for r in accepted:
        for e in r.payload["events"]:
            if e["id"] not in seen:
                seen.add(e["id"])
                order.append(e)
    assert [e["id"] for e in order] == sorted(e["id"] for e in order)
    # ... so each device's story arrives as it happened.
    story = defaultdict(list)
    for e in order:
        story[e["device_id"]].append(e["type"])
    assert {tuple(s) for d, s in story.items() if d in devices[:10]} == {("device_online", "device_offline",
                                                                          "device_online")}
    assert {tuple(s) for d, s in story.items() if d in devices[10:]} == {("device_online", "device_offline")}
    # Every request signed over its timestamp and body; a wrong secret or a changed body fails.
    for r in receiver.received:
        ts, sig = r.headers[TIMESTAMP_HEADER], r.headers[SIGNATURE_HEADER]
        assert verify(hook["secret"], ts, sig, r.body, now_s=int(ts))
        assert not verify("another-secret-0000", ts, sig, r.body, now_s=int(ts))
        assert not verify(hook["secret"], ts, sig, r.body + b" ", now_s=int(ts))
    assert all(r.headers[IDEMPOTENCY_HEADER] for r in receiver.received)

    # The delivery log tells the story of the first batch: 500, 500, timeout, timeout, delivered.
    log = client.get(f"/v1/webhooks/{hook['id']}/deliveries?limit=500", headers=admin).get_json()["deliveries"]
    head = log[-1]
    assert head["status"] == "delivered" and head["attempts"] == 5 and head["event_count"] == 8
    errors = [a["error"] for a in head["attempt_log"]]
    assert errors[:2] == ["HTTP 500", "HTTP 500"] and all("timed out" in e for e in errors[2:4]) and errors[4] is None
    assert [a["status_code"] for a in head["attempt_log"]] == [500, 500, None, None, 200]
    assert sum(d["event_count"] for d in log) == 50


def test_batches_are_given_up_after_a_day_then_new_ones_flow(engine, settings, client, admin, receiver):
    hook = register(client, admin, receiver.url, event_types=["device_offline"])
    receiver.script[:] = [FAIL] * 1000
    devices = make_devices(engine, 3)
    t0 = datetime.now(UTC).replace(microsecond=0)
    clock = Clock(t0)
    dispatcher = WebhookDispatcher(engine, settings, clock=clock)
    beat_all(engine, devices, t0)
    derive(engine, settings, t0)  # online events: not subscribed
    derive(engine, settings, t0 + timedelta(minutes=5))
    dispatcher.run_once()
    assert scalar(engine, "SELECT count(*) FROM webhook_deliveries") == 1
    for _ in range(60):  # a day and more, an hour at a time
        clock.advance(hours=0.5)
        dispatcher.run_once()
    attempts, status = scalar(engine, "SELECT array[attempts::text, status] FROM webhook_deliveries")
    # 1, 2, 4 … 2048 s apart (12 tries in the first 68 minutes), then hourly, the last at 24 h.
    first_at, last_at = scalar(engine, "SELECT array[created_at, last_attempt_at] FROM webhook_deliveries")
    print(f"given up after {attempts} attempts, the last {last_at - first_at} after the batch was made")
    assert status == "failed" and 30 <= int(attempts) <= 50
    assert timedelta(hours=24) <= last_at - first_at <= timedelta(hours=24, minutes=30)
    receiver.script[:] = []
    beat_all(engine, devices, clock.at)
    derive(engine, settings, clock.at)
    derive(engine, settings, clock.at + timedelta(minutes=5))
    clock.advance(minutes=5)
    assert dispatcher.run_once().delivered == 1
    log = client.get(f"/v1/webhooks/{hook['id']}/deliveries?status=delivered", headers=admin).get_json()
    assert len(log["deliveries"]) == 1 and log["deliveries"][0]["event_count"] == 3


def test_deleted_webhook_gets_nothing_more(engine, settings, client, admin, receiver):
    hook = register(client, admin, receiver.url)
    devices = make_devices(engine, 2)
    t0 = datetime.now(UTC).replace(microsecond=0)
    beat_all(engine, devices, t0)
    derive(engine, settings, t0)
    dispatcher = WebhookDispatcher(engine, settings, clock=Clock(t0))
    dispatcher.enqueue()
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=admin).status_code == 200
    assert dispatcher.run_once().delivered == 0 and receiver.received == []
    assert scalar(engine, "SELECT status FROM webhook_deliveries") == "cancelled"


def test_partitions_job_prunes_finished_deliveries_past_their_days(engine, settings, client, admin):
    hook = register(client, admin, "http://127.0.0.1:9/hook")
    with engine.begin() as conn:
        for status, days_ago in (("delivered", 10), ("failed", 9), ("pending", 10), ("delivered", 1)):
            conn.exec_driver_sql(
                "INSERT INTO webhook_deliveries (webhook_id, idempotency_key, first_event_id, last_event_id, "
                "event_count, body, status, created_at, next_attempt_at) VALUES (%(w)s, gen_random_uuid(), 1, 1, 1, "
                "'{}', %(s)s, now() - make_interval(days => %(d)s), now())",
                {"w": hook["id"], "s": status, "d": days_ago})
    report = run_job("partitions", engine, settings, progress=lambda line: None)
    assert report.detail["webhook_deliveries_pruned"] == 2  # kept: the pending one, and the recent one
    assert scalar(engine, "SELECT string_agg(status, ',' ORDER BY id) FROM webhook_deliveries") == "pending,delivered"


def test_two_dispatchers_at_once_send_each_batch_once(engine, settings, client, admin):
    slow = Receiver(script=[HANG] * 6, hang_s=0.2).start()  # answered in time, just slowly
    try:
        hook = register(client, admin, slow.url)
        devices = make_devices(engine, 12)
        t0 = datetime.now(UTC).replace(microsecond=0)
        beat_all(engine, devices, t0)
        derive(engine, settings, t0)
        small = settings.with_overrides(webhook_batch_max=2)
        first, second = (WebhookDispatcher(engine, small, owner=name) for name in ("one", "two"))
        first.enqueue()
        with ThreadPoolExecutor(max_workers=2) as pool:
            reports = list(pool.map(lambda d: d.run_once(), (first, second)))
        assert sum(r.delivered for r in reports) == 6 and sum(r.failed_attempts for r in reports) == 0
        keys = [r.key for r in slow.received]
        assert len(keys) == len(set(keys)) == 6  # the lease: never the same batch from both
        ids = [e["id"] for r in slow.received for e in r.payload["events"]]
        assert ids == sorted(ids)  # and still one batch at a time, in order
        assert scalar(engine, "SELECT count(*) FROM webhooks WHERE lease_owner IS NOT NULL") == 0
        assert client.get(f"/v1/webhooks/{hook['id']}/deliveries?status=delivered", headers=admin).get_json()[
            "deliveries"][0]["attempts"] == 1
    finally:
        slow.stop()


def test_a_webhook_deleted_while_its_batch_is_on_the_way_stays_cancelled(engine, settings, client, admin):
    hook = register(client, admin, "http://127.0.0.1:9/never-called")
    devices = make_devices(engine, 2)
    t0 = datetime.now(UTC).replace(microsecond=0)
    beat_all(engine, devices, t0)
    derive(engine, settings, t0)

    def deleting_sender(url, body, headers, timeout_s):  # the operator deletes it mid-request
        assert client.delete(f"/v1/webhooks/{hook['id']}", headers=admin).status_code == 200
        return SendResult(200, None)

    report = WebhookDispatcher(engine, settings, clock=Clock(t0), sender=deleting_sender).run_once()
    assert report.delivered == 0
    assert scalar(engine, "SELECT array[status, attempts::text] FROM webhook_deliveries") == ["cancelled", "0"]
