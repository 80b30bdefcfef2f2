"""A statement timeout is not an outage: heartbeats and reads that wait past
DB_STATEMENT_TIMEOUT_MS answer 503 ``statement_timeout`` (not ``database_unavailable``), the pool
is kept (the old code disposed it on any OperationalError, after which its gauges went below
zero), and the very next request is served on the same connections."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime

from tests.conftest import ADMIN_KEY
from tests.faults.conftest import enroll_fleet
from tests.support.helpers import heartbeat_body
from tests.support.live import start_server, stop_server
from tests.support.metrics_scrape import scrape


def post_heartbeat(url: str, token: str) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + "/v1/heartbeat", data=json.dumps(heartbeat_body(datetime.now(UTC))).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get_json(url: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"x-admin": ADMIN_KEY})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_statement_timeouts_keep_the_pool_and_have_their_own_reason(database_url, engine, tmp_path):
    server = start_server(database_url, ADMIN_KEY, tmp_path, workers=1, DB_STATEMENT_TIMEOUT_MS="300",
                          SCHEDULER_ENABLED="false")
    try:
        devices = enroll_fleet(server, 3, prefix="stmt-timeout")
        assert post_heartbeat(server.url, devices[0].token)[0] == 200  # the flusher has its connection
        locked, release = threading.Event(), threading.Event()

        def hold_locks() -> None:
            with engine.connect() as conn, conn.begin():
                conn.exec_driver_sql("LOCK TABLE heartbeats, device_last_status IN ACCESS EXCLUSIVE MODE")
                locked.set()
                release.wait(20)

        holder = threading.Thread(target=hold_locks, daemon=True)
        holder.start()
        assert locked.wait(10)
        try:
            answers = [post_heartbeat(server.url, d.token) for d in devices]
            listing = get_json(server.admin_url + "/v1/devices?limit=10")
        finally:
            release.set()
            holder.join(10)
        for status, body in answers:
            assert status == 503 and body["error"] == "statement_timeout", (status, body)
        assert listing[0] == 503 and listing[1]["error"] == "statement_timeout", listing
        # The database was up all along: served again at once, on the connections it had.
        for d in devices:
            assert post_heartbeat(server.url, d.token)[0] == 200
        assert get_json(server.admin_url + "/v1/devices?limit=10")[0] == 200
        time.sleep(2.5)  # one sampler period, so every gauge is fresh
        m = scrape(server.admin_url, ADMIN_KEY)
        assert m.value("nexmdm_heartbeats_rejected_total", reason="statement_timeout") == 3
        assert m.value("nexmdm_heartbeats_rejected_total", reason="database_unavailable") == 0
        for gauge in ("nexmdm_db_pool_checked_out_connections", "nexmdm_db_pool_overflow_connections",
                      "nexmdm_db_pool_utilization_ratio"):
            assert m.value(gauge, plane="device") >= 0, (gauge, m.value(gauge, plane="device"))
        # The flusher kept its connection: one checked out on the device plane, none lost.
        assert m.value("nexmdm_db_pool_checked_out_connections", plane="device") >= 1
        assert "Traceback" not in server.log(), server.log()[-3000:]
    finally:
        stop_server(server)


def test_pool_gauges_come_from_the_live_pool_only(database_url):
    """Connections that return to a disposed pool do not speak for the pool that replaced it
    (the old code published the old pool's figures: checked_out -3 here)."""
    from prometheus_client import REGISTRY

    from api.metrics import MeteredQueuePool
    from config.settings import Settings
    from db.engine import make_engine

    plane = {"plane": MeteredQueuePool.plane}
    engine = make_engine(Settings(database_url=database_url, db_pool_size=3, db_max_overflow=2), database_url,
                         pool_class=MeteredQueuePool)
    try:
        held = [engine.connect() for _ in range(3)]
        assert REGISTRY.get_sample_value("nexmdm_db_pool_checked_out_connections", plane) == 3
        engine.dispose()  # a new, empty pool
        for conn in held:
            conn.close()  # back to the old pool
        assert REGISTRY.get_sample_value("nexmdm_db_pool_checked_out_connections", plane) == 0
        with engine.connect():
            assert REGISTRY.get_sample_value("nexmdm_db_pool_checked_out_connections", plane) == 1
        assert REGISTRY.get_sample_value("nexmdm_db_pool_checked_out_connections", plane) == 0
        assert REGISTRY.get_sample_value("nexmdm_db_pool_utilization_ratio", plane) == 0
    finally:
        engine.dispose()
