"""PostgreSQL restarted under a running app: while it is down every path (heartbeat writes via
the group-commit writer, token look-ups, reads, enrollment, /readyz) answers 503 + Retry-After, not a 500
and not a hang; no pooled connection leaks; within 10 s of the database returning it works
again, without restarting the app (SQLAlchemy invalidates the pool on the first disconnect)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.support.helpers import bearer, enroll, heartbeat_body
from tests.support.live import ROOT


@pytest.fixture
def restore_cluster(pg_cluster, engine):
    yield pg_cluster
    if not pg_cluster.running():
        pg_cluster.start()
    engine.dispose()


def assert_503(resp) -> None:
    assert resp.status_code == 503, (resp.status_code, resp.get_data(as_text=True)[:300])
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.get_json()["error"] == "database_unavailable", resp.get_json()


def test_every_path_answers_503_while_down_and_recovers(app, client, admin, engine, restore_cluster):
    cluster = restore_cluster
    known, other = enroll(client, admin, 2)
    assert client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(known["token"])).status_code == 200
    cluster.stop("fast")
    started = time.monotonic()
    assert_503(client.post("/v1/heartbeat", json=heartbeat_body(battery_pct=1), headers=bearer(known["token"])))
    # A token not cached yet needs the database: 503 (retry), not 401 (which would be a lie).
    assert_503(client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(other["token"])))
    assert_503(client.get(f"/v1/devices/{known['id']}", headers=admin))
    assert_503(client.get("/v1/devices", headers=admin))
    assert_503(client.get("/v1/fleet/summary", headers=admin))
    assert_503(client.get(f"/v1/devices/{known['id']}/heartbeats", headers=admin))
    assert_503(client.post("/v1/devices/enroll", json={"device_uid": "while-down"}, headers=admin))
    readyz = client.get("/readyz")
    assert readyz.status_code == 503 and readyz.headers["Retry-After"] and readyz.get_json()["status"] == "unavailable"
    assert time.monotonic() - started < 5  # refused at once, no hang
    assert engine.pool.checkedout() == 0  # nothing leaked by the failures

    cluster.start()
    up = time.monotonic()
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() - up < 10
        time.sleep(0.1)
    resp = client.post("/v1/heartbeat", json=heartbeat_body(battery_pct=2), headers=bearer(other["token"]))
    assert resp.status_code == 200
    assert client.get(f"/v1/devices/{other['id']}", headers=admin).status_code == 200
    assert client.get("/v1/fleet/summary", headers=admin).status_code == 200
    assert time.monotonic() - up < 10
    # Nothing leaked: only the heartbeat writer's own long-lived connection is out (one flusher).
    assert app.extensions["nexmdm"].writer.stats()["connections"] == 1
    assert engine.pool.checkedout() == 1
    with engine.connect() as conn:  # the write refused while down was not half-stored
        assert conn.exec_driver_sql("SELECT count(*) FROM heartbeats WHERE battery_pct = 1").scalar_one() == 0
        assert conn.exec_driver_sql("SELECT count(*) FROM devices WHERE device_uid = 'while-down'").scalar_one() == 0


def test_group_commit_writer_across_a_restart(client, admin, engine, restore_cluster, database_url):
    cluster = restore_cluster
    (device,) = enroll(client, admin, 1)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.outage_probe", database_url, str(device["id"]),
         str(cluster.data_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"][0] == "stored"
    assert all(status.startswith("unavailable:") for status, _ in out["down"]), out["down"]
    assert max(seconds for _, seconds in out["down"]) < 5, out["down"]
    assert out["checked_out_down"] == 0
    assert out["after"] == "stored" and out["recovered_s"] < 10, out
    # Nothing leaked: only the flusher's own long-lived connection is out (INGEST_FLUSHERS=1).
    assert out["checked_out_after"] <= 1


def test_a_pool_timeout_is_pool_exhausted_on_the_write_path_too(settings, admin, engine):
    """One translation: the heartbeat writer answers a pool timeout as the reads do (it answered
    database_unavailable while the read paths answered pool_exhausted)."""
    from api.app import create_app
    from db.engine import make_engine

    small = settings.with_overrides(db_pool_size=1, db_max_overflow=0, db_pool_timeout_s=0.2)
    small_engine = make_engine(small, small.database_url)
    app = create_app(small, engine=small_engine)
    app.testing = True
    client = app.test_client()
    try:
        (device,) = enroll(client, admin, 1)
        with app.app_context():
            app.extensions["nexmdm"].tokens.authenticate(device["token"])  # cached: no look-up needed
        with small_engine.connect():  # the pool's only connection, held
            for resp in (
                client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(device["token"])),
                client.get(f"/v1/devices/{device['id']}", headers=admin),
            ):
                assert resp.status_code == 503, resp.get_data(as_text=True)
                assert resp.get_json()["error"] == "pool_exhausted", resp.get_json()
                assert resp.headers["Retry-After"] == "1"
        resp = client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(device["token"]))
        assert resp.status_code == 200, resp.get_json()
    finally:
        app.extensions["nexmdm"].close()
        small_engine.dispose()
