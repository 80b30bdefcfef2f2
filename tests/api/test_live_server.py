"""The real server (gunicorn, gevent workers, group commit) end to end."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.support.helpers import heartbeat_body
from tests.support.live import call


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
