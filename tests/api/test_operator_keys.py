"""Named operator keys with roles (viewer < operator < admin), the CLI that manages them, and the
audit trail every change leaves."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.helpers import bearer, enroll, heartbeat_body
from tests.support.live import ROOT


def make_key(client, admin, name: str, role: str) -> dict[str, str]:
    resp = client.post("/v1/keys", json={"name": name, "role": role}, headers=admin)
    assert resp.status_code == 201, resp.get_json()
    assert resp.headers["Cache-Control"] == "no-store"
    return {"x-admin": resp.get_json()["key"]}


def audit_rows(client, admin, **params) -> list[dict]:
    resp = client.get("/v1/audit", query_string=params, headers=admin)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["entries"]


def test_each_role_can_do_what_it_may_and_nothing_more(client, admin):
    (device,) = enroll(client, admin, 1)
    viewer = make_key(client, admin, "vera", "viewer")
    operator = make_key(client, admin, "otto", "operator")
    admin_key = make_key(client, admin, "ada", "admin")
    dev = device["id"]
    reads = [("GET", f"/v1/devices/{dev}"), ("GET", "/v1/devices"), ("GET", "/v1/fleet/summary"),
             ("GET", f"/v1/devices/{dev}/heartbeats"), ("GET", "/metrics"), ("GET", "/ops/pool_health"),
             ("GET", "/ops/jobs")]
    operations = [("POST", "/ops/partitions"), ("POST", f"/v1/devices/{dev}/token"),
                  ("POST", f"/v1/devices/{dev}/revoke")]
    administration = [("POST", "/v1/devices/enroll"), ("GET", "/v1/keys"), ("POST", "/v1/keys"),
                      ("GET", "/v1/audit")]
    bodies = {"/v1/devices/enroll": {"device_uid": "by-role"}, "/v1/keys": {"name": "made", "role": "viewer"}}

    def status(method: str, url: str, key: dict[str, str]) -> tuple[int, str | None]:
        resp = client.open(url, method=method, json=bodies.get(url), headers=key)
        return resp.status_code, (resp.get_json() or {}).get("error") if resp.status_code >= 400 else None

    for method, url in reads:
        for key in (viewer, operator, admin_key, admin):
            assert status(method, url, key)[0] == 200, (method, url, key)
    for method, url in operations + administration:
        assert status(method, url, viewer) == (403, "role_forbidden"), (method, url)
    for method, url in administration:
        assert status(method, url, operator) == (403, "role_forbidden"), (method, url)
    for method, url in operations:
        assert status(method, url, operator)[0] in (200, 201), (method, url)
    bodies["/v1/keys"] = {"name": "made2", "role": "viewer"}
    bodies["/v1/devices/enroll"] = {"device_uid": "by-admin"}
    for method, url in administration:
        assert status(method, url, admin_key)[0] in (200, 201), (method, url)
    # /metrics takes any key as a bearer token too (Prometheus 2.x sends no custom headers)
    assert client.get("/metrics", headers=bearer(viewer["x-admin"])).status_code == 200


def test_a_revoked_key_is_refused_at_once_and_keys_are_stored_hashed(client, admin, engine):
    otto = make_key(client, admin, "otto", "operator")
    key_id = client.get("/v1/keys", headers=admin).get_json()["keys"][0]["id"]
    assert client.get("/v1/fleet/summary", headers=otto).status_code == 200
    resp = client.post(f"/v1/keys/{key_id}/revoke", headers=admin)
    assert resp.status_code == 200 and resp.get_json()["revoked_at"]
    resp = client.get("/v1/fleet/summary", headers=otto)
    assert resp.status_code == 403 and resp.get_json()["error"] == "admin_key_invalid"
    assert client.post("/v1/keys/999/revoke", headers=admin).status_code == 404
    assert client.post("/v1/keys", json={"name": "otto", "role": "admin"}, headers=admin).status_code == 409
    assert client.post("/v1/keys", json={"name": "bad\nname", "role": "admin"}, headers=admin).status_code == 422
    assert client.post("/v1/keys", json={"name": "x", "role": "root"}, headers=admin).status_code == 422
    with engine.connect() as conn:
        dump = " ".join(str(r) for r in conn.exec_driver_sql("SELECT * FROM operator_keys"))
        dump += " ".join(str(r) for r in conn.exec_driver_sql("SELECT * FROM audit_log"))
    secret = otto["x-admin"]
    assert secret not in dump and secret.removeprefix("nxk_") not in dump


def test_every_change_leaves_an_audit_row(client, admin):
    (device,) = enroll(client, admin, 1)
    otto = make_key(client, admin, "otto", "operator")
    vera = make_key(client, admin, "vera", "viewer")
    dev = device["id"]
    assert client.post(f"/v1/devices/{dev}/token", headers=otto).status_code == 201
    assert client.post(f"/v1/devices/{dev}/revoke", headers=vera).status_code == 403  # denied
    assert client.post("/v1/devices/424242/revoke", headers=otto).status_code == 404  # failed
    assert client.post(f"/v1/devices/{dev}/revoke", headers=otto).status_code == 200
    assert client.post("/ops/partitions", headers=otto).status_code == 200
    assert client.post("/v1/keys/999/revoke", headers=admin).status_code == 404
    # reads leave no row; neither does a request whose key is unknown (no flood of rows by outsiders)
    assert client.get("/v1/fleet/summary", headers=vera).status_code == 200
    assert client.post(f"/v1/devices/{dev}/revoke", headers={"x-admin": "guess"}).status_code == 403
    assert client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(device["token"])).status_code == 401

    rows = audit_rows(client, admin)
    seen = [(r["actor"], r["action"], r["target"], r["outcome"]) for r in reversed(rows)]
    assert seen == [
        ("ADMIN_KEY", "device.enroll", "devices:1", "ok"),
        ("ADMIN_KEY", "key.create", seen[1][2], "ok"),
        ("ADMIN_KEY", "key.create", seen[2][2], "ok"),
        ("otto", "device.rotate", f"device:{dev}", "ok"),
        ("vera", "device.revoke", f"device:{dev}", "denied"),
        ("otto", "device.revoke", "device:424242", "failed"),
        ("otto", "device.revoke", f"device:{dev}", "ok"),
        ("otto", "job.partitions", None, "ok"),
        ("ADMIN_KEY", "key.revoke", "key:999", "failed"),
    ]
    assert all(r["source_addr"] == "127.0.0.1" and r["at"] for r in rows)
    assert rows[4]["actor_role"] == "viewer" and rows[4]["detail"]["needs"] == "operator"
    assert rows[-1]["detail"]["devices"][0]["device_uid"] == device["device_uid"]
    # keyset pages, newest first; filter by action
    first = client.get("/v1/audit?limit=4", headers=admin).get_json()
    second = client.get(f"/v1/audit?limit=4&before={first['next_before']}", headers=admin).get_json()
    assert [r["id"] for r in first["entries"] + second["entries"]] == [r["id"] for r in rows[:8]]
    assert {r["action"] for r in audit_rows(client, admin, action="key.create")} == {"key.create"}
    assert client.get("/v1/audit?before=x", headers=admin).status_code == 400


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api", "keys", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_keys_cli_creates_lists_and_revokes(client, database_url, tmp_path):
    env = dict(os.environ, DATABASE_URL=database_url, VAR_DIR=str(tmp_path))
    created = _cli("create", "--name", "ci-bot", "--role", "operator", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("nxk_")
    assert client.get("/v1/fleet/summary", headers={"x-admin": key}).status_code == 200
    assert client.post("/v1/devices/enroll", json={"device_uid": "x"}, headers={"x-admin": key}).status_code == 403
    listed = _cli("list", env=env)
    assert listed.returncode == 0 and "ci-bot" in listed.stdout and "operator" in listed.stdout
    assert key not in listed.stdout
    assert _cli("create", "--name", "ci-bot", "--role", "viewer", env=env).returncode == 1  # name taken
    assert _cli("create", "--name", "x", "--role", "root", env=env).returncode == 2  # usage
    revoked = _cli("revoke", "ci-bot", env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert client.get("/v1/fleet/summary", headers={"x-admin": key}).status_code == 403
    assert _cli("revoke", "nobody", env=env).returncode == 1


def test_the_console_events_panel_shows_audit_rows(live_server):
    from console.sources.feed import ALERT, INFO, AuditSource
    from console.sources.http import ApiClient

    admin_client = ApiClient(live_server.admin_url, live_server.admin_key)
    source = AuditSource(admin_client)
    assert source.poll() == [] and source.cursor == 0
    created = admin_client.post_json("/v1/keys", {"name": "vera", "role": "viewer"})
    enrolled = admin_client.post_json("/v1/devices/enroll", {"device_uid": "panel-1"})
    viewer = ApiClient(live_server.admin_url, created["key"])
    device_id = enrolled["devices"][0]["id"]
    try:
        viewer.post_json(f"/v1/devices/{device_id}/revoke", {})
    except Exception:  # noqa: BLE001 - refused (403), which is the point
        pass
    lines = source.poll()
    assert [(ln.source, ln.severity) for ln in lines] == [("audit", INFO), ("audit", INFO), ("audit", ALERT)]
    assert lines[0].text == f"ADMIN_KEY (admin) key.create key:{created['id']} from 127.0.0.1"
    assert lines[2].text == f"vera (viewer) device.revoke device:{device_id} DENIED from 127.0.0.1"
    assert source.poll() == []  # each row once
    viewer_source = AuditSource(viewer)  # a viewer may not read the audit: the source stays quiet
    assert viewer_source.poll() == [] and viewer_source.unavailable
