"""Enrollment, token rotation with overlap, revocation, token storage."""

from __future__ import annotations

import hashlib

from tests.support.helpers import bearer, enroll, heartbeat_body


def test_enroll_single_and_batch(client, admin, engine):
    one = client.post("/v1/devices/enroll", json={"device_uid": "solo", "labels": ["eu"]}, headers=admin)
    assert one.status_code == 201
    [dev] = one.get_json()["devices"]
    assert dev["device_uid"] == "solo" and dev["token"].startswith("nxm_")
    batch = enroll(client, admin, 250)
    assert len({d["id"] for d in batch}) == 250


def test_tokens_are_stored_only_as_hashes(client, admin, engine):
    dev = enroll(client, admin)[0]
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT token_hash FROM devices WHERE id = %s", (dev["id"],)).scalar_one()
        dump = conn.exec_driver_sql("SELECT row_to_json(d)::text FROM devices d").scalar_one()
    assert bytes(stored) == hashlib.sha256(dev["token"].encode()).digest()
    assert dev["token"] not in dump


def test_reenrolling_a_uid_is_a_conflict_and_writes_nothing(client, admin, engine):
    enroll(client, admin, 1, prefix="dup")
    resp = client.post(
        "/v1/devices/enroll", json={"devices": [{"device_uid": "fresh"}, {"device_uid": "dup-0"}]}, headers=admin
    )
    assert resp.status_code == 409
    assert resp.get_json()["detail"]["device_uids"] == ["dup-0"]
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM devices").scalar_one() == 1


def test_rotation_keeps_old_token_for_the_overlap_then_stops(client, admin, app, engine):
    dev = enroll(client, admin)[0]
    resp = client.post(f"/v1/devices/{dev['id']}/token", headers=admin)
    assert resp.status_code == 201
    new = resp.get_json()["token"]
    assert client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(new)).status_code == 200
    # the old token still works during the overlap ...
    assert client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(dev["token"])).status_code == 200
    # ... and stops once the overlap has passed
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE devices SET prev_token_expires_at = now() - interval '1 second' WHERE id = %s", (dev["id"],)
        )
    app.extensions["nexmdm"].tokens.evict([hashlib.sha256(dev["token"].encode()).digest()])
    old = client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(dev["token"]))
    assert old.status_code == 401 and old.get_json()["error"] == "token_invalid"
    assert client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(new)).status_code == 200


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_previous_token_is_cached_no_longer_than_its_overlap(client, admin, app, settings, engine):
    from api.auth import TokenCache

    clock = FakeClock()
    state = app.extensions["nexmdm"]
    state.tokens = TokenCache(engine, ttl_s=86_400, sync_interval_s=3600, clock=clock)
    dev = enroll(client, admin)[0]
    state.settings = settings.with_overrides(token_rotation_overlap_s=60)
    client.post(f"/v1/devices/{dev['id']}/token", headers=admin)
    # Cached now, for what is left of the overlap (about 60 s), not for the day-long TTL.
    assert client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(dev["token"])).status_code == 200
    with engine.begin() as conn:  # the database's clock moves past the overlap too
        conn.exec_driver_sql(
            "UPDATE devices SET prev_token_expires_at = now() - interval '1 second' WHERE id = %s", (dev["id"],)
        )
    clock.now += 50
    assert client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(dev["token"])).status_code == 200
    clock.now += 11
    assert client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(dev["token"])).status_code == 401


def test_revoked_device_is_refused_at_once_on_this_worker(client, admin):
    dev = enroll(client, admin)[0]
    assert client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(dev["token"])).status_code == 200
    assert client.post(f"/v1/devices/{dev['id']}/revoke", headers=admin).status_code == 200
    resp = client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(dev["token"]))
    assert resp.status_code == 401


def test_rotate_or_revoke_unknown_device_is_404(client, admin):
    assert client.post("/v1/devices/999999/token", headers=admin).status_code == 404
    assert client.post("/v1/devices/999999/revoke", headers=admin).get_json()["error"] == "device_not_found"


def test_revocation_reaches_other_workers_within_the_sync_interval(client, admin, engine):
    """Another worker's cache (its own TokenCache) drops a revoked token at its next sync."""
    from api.auth import TokenCache
    from api.errors import ApiError

    dev = enroll(client, admin)[0]
    clock = FakeClock()
    other_worker = TokenCache(engine, ttl_s=900, sync_interval_s=0.2, clock=clock)
    assert other_worker.authenticate(dev["token"]) == dev["id"]
    assert client.post(f"/v1/devices/{dev['id']}/revoke", headers=admin).status_code == 200
    clock.now += 0.19
    assert other_worker.authenticate(dev["token"]) == dev["id"]  # still cached before the sync
    clock.now += 0.05
    try:
        other_worker.authenticate(dev["token"])
        raise AssertionError("revoked token still accepted after the sync interval")
    except ApiError as exc:
        assert exc.status == 401
    assert other_worker.syncs >= 1


def test_token_owners_in_one_statement(client, admin, engine):
    from db.devices import find_token_owners, hash_token

    a, b, c = enroll(client, admin, 3)
    rotated = client.post(f"/v1/devices/{b['id']}/token", headers=admin).get_json()
    client.post(f"/v1/devices/{c['id']}/revoke", headers=admin)
    tokens = [a["token"], b["token"], rotated["token"], c["token"], "nxm_unknown"]
    with engine.connect() as conn:
        owners = find_token_owners(conn, [hash_token(t) for t in tokens])
    assert owners[hash_token(a["token"])].device_id == a["id"]
    assert owners[hash_token(a["token"])].valid_until is None
    assert owners[hash_token(b["token"])].device_id == b["id"]  # previous token, within its overlap
    assert owners[hash_token(b["token"])].valid_until is not None
    assert owners[hash_token(rotated["token"])].device_id == b["id"]
    assert hash_token(c["token"]) not in owners and hash_token("nxm_unknown") not in owners
