"""Authentication and authorisation: every admin endpoint (enumerated from the Flask url_map,
so a new one is covered automatically) refuses a missing key (401) and a wrong one (403); a
device token writes only its own device and reads nothing; revocation takes effect; tokens
are stored only as hashes."""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY

from tests.support.helpers import (
    bearer,
    enroll,
    heartbeat_body,
    settings_on_both_heartbeat_paths,  # noqa: F401 (the "settings" fixture: every test on both paths)
)

# Routes that are not operator-only. Anything else in the url_map must refuse without x-admin:
# a new public route has to be added here on purpose.
PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/openapi.json")}
DEVICE = {("POST", "/v1/heartbeat")}


def admin_routes(app) -> list[tuple[str, str]]:
    """(method, concrete URL) of every route that is neither public nor a device route."""
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            if (method, rule.rule) in PUBLIC | DEVICE:
                continue
            values = {name: 1 if type(conv).__name__ in ("IntegerConverter", "FloatConverter") else "x"
                      for name, conv in rule._converters.items()}
            out.append((method, rule.build(values, append_unknown=False)[1]))
    return out


def test_admin_routes_are_enumerated(app):
    routes = admin_routes(app)
    assert ("POST", "/v1/devices/enroll") in routes and ("GET", "/v1/fleet/summary") in routes
    assert len(routes) >= 7


def test_every_admin_route_refuses_missing_and_wrong_key(client, app, admin, engine):
    devices = enroll(client, admin, 1)
    token = devices[0]["token"]
    key = admin["x-admin"]
    wrong_keys = ["wrong", key + "x", key[:-1], key.upper(), " " + key]
    for method, url in admin_routes(app):
        resp = client.open(url, method=method, json={"device_uid": "sneaky"})
        assert resp.status_code == 401, (method, url, resp.status_code)
        assert resp.get_json()["error"] == "admin_key_required"
        # A device token is not an operator key, whichever header carries it (/metrics also
        # takes the operator key as a bearer token, as scrapers send it: there it is a wrong key).
        resp = client.open(url, method=method, json={"device_uid": "sneaky"}, headers=bearer(token))
        assert resp.status_code in (401, 403), (method, url, resp.status_code)
        for key in [*wrong_keys, token]:
            resp = client.open(url, method=method, json={"device_uid": "sneaky"}, headers={"x-admin": key})
            assert resp.status_code == 403, (method, url, key, resp.status_code)
            assert resp.get_json()["error"] == "admin_key_invalid"
    with engine.connect() as conn:  # nothing refused was written: only the one enrolled device
        assert conn.exec_driver_sql("SELECT count(*) FROM devices").scalar_one() == 1
        assert conn.exec_driver_sql("SELECT count(*) FROM devices WHERE revoked_at IS NOT NULL").scalar_one() == 0


def test_admin_key_compared_in_constant_time(client, admin, monkeypatch):
    import api.auth

    calls = []
    real = api.auth.hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api.auth.hmac, "compare_digest", recording)
    assert client.get("/v1/fleet/summary", headers={"x-admin": "nope"}).status_code == 403
    assert client.get("/v1/fleet/summary", headers=admin).status_code == 200
    assert len(calls) == 2


def test_device_token_writes_only_its_own_device(client, admin, engine):
    a, b = enroll(client, admin, 2)
    body = heartbeat_body(device_id=b["id"], device_uid=b["device_uid"], id=b["id"])
    resp = client.post("/v1/heartbeat", json=body, headers=bearer(a["token"]))
    assert resp.status_code == 200 and resp.get_json()["device_id"] == a["id"]
    with engine.connect() as conn:
        owners = [r[0] for r in conn.exec_driver_sql("SELECT device_id FROM heartbeats")]
        status_owners = [r[0] for r in conn.exec_driver_sql("SELECT device_id FROM device_last_status")]
    assert owners == [a["id"]] and status_owners == [a["id"]]


def test_device_token_reads_nothing(client, app, admin):
    (device,) = enroll(client, admin, 1)
    for method, url in admin_routes(app):
        if method != "GET":
            continue
        for headers in (bearer(device["token"]), {"x-admin": device["token"]}):
            resp = client.get(url.replace("/1", f"/{device['id']}"), headers=headers)
            assert resp.status_code in (401, 403), (url, resp.status_code)
            assert device["device_uid"] not in resp.get_data(as_text=True)


def test_token_cache_misses_are_counted_once_per_token(client, admin):
    def misses() -> float:
        return REGISTRY.get_sample_value("nexmdm_token_cache_misses_total") or 0.0

    (device,) = enroll(client, admin, 1)
    before = misses()
    for _ in range(3):  # stored, then duplicates: all authenticated
        assert client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(device["token"])).status_code == 200
    assert misses() == before + 1  # looked up once, then served from the cache
    client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer("not-a-token"))
    assert misses() == before + 2


def test_revoked_token_stops_at_once_on_the_same_worker(client, admin, engine):
    (device,) = enroll(client, admin, 1)
    assert client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(device["token"])).status_code == 200
    assert client.post(f"/v1/devices/{device['id']}/revoke", headers=admin).status_code == 200
    later = heartbeat_body(sent_at=None)
    resp = client.post("/v1/heartbeat", json=later, headers=bearer(device["token"]))
    assert resp.status_code == 401 and resp.get_json()["error"] == "token_invalid"


def test_tokens_are_stored_only_as_hashes(client, admin, engine):
    devices = enroll(client, admin, 5)
    rotated = client.post(f"/v1/devices/{devices[0]['id']}/token", headers=admin).get_json()["token"]
    with engine.connect() as conn:
        dump = "\n".join(r[0] for r in conn.exec_driver_sql("SELECT row_to_json(d)::text FROM devices d"))
        dump += "\n".join(r[0] for r in conn.exec_driver_sql(
            "SELECT encode(token_hash, 'escape') FROM devices"))
    for token in [d["token"] for d in devices] + [rotated]:
        assert token not in dump
        assert token.removeprefix("nxm_") not in dump


@pytest.mark.parametrize("sync_s", [1.0])
def test_revoked_token_stops_on_every_worker_within_the_sync_interval(database_url, engine, tmp_path, sync_s):
    """Every worker learns of a revocation within TOKEN_SYNC_INTERVAL_S (the documented delay),
    however long TOKEN_CACHE_TTL_S keeps a token cached."""
    import json
    import urllib.error
    import urllib.request

    from tests.conftest import ADMIN_KEY
    from tests.faults.conftest import enroll_fleet
    from tests.support.live import start_server, stop_server

    server = start_server(database_url, ADMIN_KEY, tmp_path, workers=2, TOKEN_CACHE_TTL_S="900",
                          TOKEN_SYNC_INTERVAL_S=str(sync_s))
    try:
        (device,) = enroll_fleet(server, 1, prefix="revoke")

        def heartbeat(second: int) -> int:
            body = heartbeat_body(sent_at=None)
            body["sent_at"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - second * 10))
            req = urllib.request.Request(
                server.url + "/v1/heartbeat", data=json.dumps(body).encode(), method="POST",
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {device.token}",
                         "Connection": "close"},
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status
            except urllib.error.HTTPError as err:
                return err.code

        assert {heartbeat(i) for i in range(20)} == {200}  # both workers have it cached
        req = urllib.request.Request(server.admin_url + f"/v1/devices/{device.id}/revoke", method="POST",
                                     headers={"x-admin": ADMIN_KEY})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        time.sleep(sync_s + 0.5)
        assert {heartbeat(20 + i) for i in range(20)} == {401}
    finally:
        stop_server(server)
