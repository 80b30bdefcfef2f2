"""The real server (gunicorn, gevent workers, group commit) end to end."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tests.support.helpers import heartbeat_body


def call(url: str, method: str = "GET", body=None, headers=None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_concurrent_heartbeats_through_gunicorn_are_all_stored(live_server, engine):
    admin = {"x-admin": live_server.admin_key}
    devices = [{"device_uid": f"live-{i}"} for i in range(200)]
    status, enrolled = call(live_server.admin_url + "/v1/devices/enroll", "POST", {"devices": devices}, admin)
    assert status == 201

    def send(dev: dict) -> tuple[int, dict]:
        return call(live_server.url + "/v1/heartbeat", "POST", heartbeat_body(),
                    {"Authorization": f"Bearer {dev['token']}"})

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(send, enrolled["devices"]))
    assert all(code == 200 and body["status"] == "stored" for code, body in results), results[:3]
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM heartbeats").scalar_one() == 200
        assert conn.exec_driver_sql("SELECT count(*) FROM device_last_status").scalar_one() == 200
    status, summary = call(live_server.admin_url + "/v1/fleet/summary", headers=admin)
    assert status == 200 and summary["total"] == 200 and summary["online"] == 200
