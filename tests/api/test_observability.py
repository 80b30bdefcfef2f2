"""/metrics, /ops/pool_health and the metered pool: first in one process (Flask test client, real
DB), then on a real multi-worker server (gunicorn, gevent, multiprocess mode). The alert rules
and the dashboard built on these metrics: tests/config/test_monitoring.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
from prometheus_client import REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api.metrics import LATENCY_BUCKETS_S, MeteredQueuePool
from db.engine import make_engine
from tests.conftest import ADMIN_KEY
from tests.support.helpers import bearer, enroll, heartbeat_body
from tests.support.live import ROOT, call, live_workers, start_server
from tests.support.metrics_scrape import (
    bucket_around,
    bucket_delta,
    histogram_quantile,
    nearest_rank,
    parse,
    scrape,
)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_needs_the_admin_key(client, admin):
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"x-admin": "wrong"}).status_code == 403
    resp = client.get("/metrics", headers=admin)
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    # Prometheus 2.x sends a bearer token, not custom headers.
    assert client.get("/metrics", headers=bearer(admin["x-admin"])).status_code == 200
    assert client.get("/metrics", headers=bearer("wrong")).status_code == 403


def test_heartbeat_outcomes_are_counted_by_the_real_handlers(client, admin):
    device = enroll(client, admin, 1)[0]
    accepted, duplicate = sample("nexmdm_heartbeats_accepted_total"), sample("nexmdm_heartbeats_duplicate_total")
    malformed = sample("nexmdm_heartbeats_rejected_total", reason="malformed_json")
    missing = sample("nexmdm_heartbeats_rejected_total", reason="token_required")
    media = sample("nexmdm_heartbeats_rejected_total", reason="unsupported_media_type")
    observed = sample("nexmdm_heartbeat_write_duration_seconds_count")

    body = heartbeat_body()
    assert client.post("/v1/heartbeat", json=body, headers=bearer(device["token"])).get_json()["status"] == "stored"
    assert client.post("/v1/heartbeat", json=body, headers=bearer(device["token"])).get_json()["status"] == "duplicate"
    assert client.post("/v1/heartbeat", data=b"{nope", headers={**bearer(device["token"]),
                       "Content-Type": "application/json"}).status_code == 400
    assert client.post("/v1/heartbeat", json=body).status_code == 401
    assert client.post("/v1/heartbeat", data=b"x", headers={**bearer(device["token"]),
                       "Content-Type": "text/plain"}).status_code == 415
    assert client.get(f"/v1/devices/{device['id']}/heartbeats", headers={"x-admin": "bad"}).status_code == 403

    assert sample("nexmdm_heartbeats_accepted_total") == accepted + 1
    assert sample("nexmdm_heartbeats_duplicate_total") == duplicate + 1
    assert sample("nexmdm_heartbeats_rejected_total", reason="malformed_json") == malformed + 1
    assert sample("nexmdm_heartbeats_rejected_total", reason="token_required") == missing + 1
    assert sample("nexmdm_heartbeats_rejected_total", reason="unsupported_media_type") == media + 1
    assert sample("nexmdm_heartbeat_write_duration_seconds_count") == observed + 2  # acknowledged ones only
    scraped = parse(client.get("/metrics", headers=admin).get_data(as_text=True))
    assert scraped.value("nexmdm_heartbeats_accepted_total") == accepted + 1
    # The hot path stays out of the generic request metrics (the heartbeat ones cover it).
    assert not [labels for name, labels in scraped.samples
                if name.startswith("nexmdm_http_request") and ("endpoint", "heartbeats.post_heartbeat") in labels]


def test_fast_reads_are_timed_by_query_type(client, admin):
    device = enroll(client, admin, 1)[0]
    name = "nexmdm_last_status_read_duration_seconds_count"
    counts = {q: sample(name, query=q) for q in ("device", "list", "summary")}
    assert client.get(f"/v1/devices/{device['id']}", headers=admin).status_code == 200
    assert client.get("/v1/devices", headers=admin).status_code == 200
    assert client.get("/v1/fleet/summary", headers=admin).status_code == 200
    assert client.get("/v1/devices/999999", headers=admin).status_code == 404  # not a successful read
    for query, before in counts.items():
        assert sample(name, query=query) == before + 1


def test_pool_health_in_one_process(client, admin, engine):
    assert client.get("/ops/pool_health").status_code == 401
    health = client.get("/ops/pool_health", headers=admin).get_json()
    assert health["status"] == "OK" and health["reasons"] == []
    assert health["workers"] == 1 and health["capacity"] == 10
    pg = health["postgres"]
    assert pg["max_connections"] == 600 and pg["in_use"] >= 1
    assert pg["headroom"] == pg["max_connections"] - pg["reserved_connections"] - pg["in_use"]
    with engine.connect(), engine.connect():  # two of this process's connections are in use
        held = client.get("/ops/pool_health", headers=admin).get_json()
    assert held["in_use"] == 2 and held["utilization_pct"] == 20.0
    # The seed's monitoring command: curl .../ops/pool_health | jq .pool.utilization_pct
    assert held["pool"]["utilization_pct"] == 20.0 and held["pool"]["in_use"] == 2


def test_openapi_lists_the_new_endpoints(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    assert paths["/metrics"]["get"]["security"] == [{"adminKey": []}]
    assert "PoolHealth" in paths["/ops/pool_health"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"]["$ref"]


def test_metered_pool_publishes_use_waits_and_timeouts(settings, database_url):
    engine = make_engine(settings.with_overrides(db_pool_size=1, db_max_overflow=1, db_pool_timeout_s=0.2),
                         database_url, pool_class=MeteredQueuePool)
    try:
        assert sample("nexmdm_db_pool_size_connections", plane="all") == 1
        assert sample("nexmdm_db_pool_max_overflow_connections", plane="all") == 1
        timeouts = sample("nexmdm_db_pool_checkout_timeouts_total")
        waits = sample("nexmdm_db_pool_checkout_wait_seconds_count")
        slow_waits = sample("nexmdm_db_pool_checkout_wait_seconds_count") - sample(
            "nexmdm_db_pool_checkout_wait_seconds_bucket", le="0.1")
        with engine.connect():
            assert sample("nexmdm_db_pool_checked_out_connections", plane="all") == 1
            assert sample("nexmdm_db_pool_utilization_ratio", plane="all") == 0.5
            with engine.connect():
                assert sample("nexmdm_db_pool_checked_out_connections", plane="all") == 2
                assert sample("nexmdm_db_pool_overflow_connections", plane="all") == 1
                assert sample("nexmdm_db_pool_utilization_ratio", plane="all") == 1.0
                started = time.perf_counter()
                with pytest.raises(PoolTimeout):
                    engine.connect()
                assert time.perf_counter() - started >= 0.2
        assert sample("nexmdm_db_pool_checked_out_connections", plane="all") == 0
        assert sample("nexmdm_db_pool_utilization_ratio", plane="all") == 0
        assert sample("nexmdm_db_pool_checkout_timeouts_total") == timeouts + 1
        assert sample("nexmdm_db_pool_checkout_wait_seconds_count") == waits + 3
        now_slow = sample("nexmdm_db_pool_checkout_wait_seconds_count") - sample(
            "nexmdm_db_pool_checkout_wait_seconds_bucket", le="0.1")
        assert now_slow == slow_waits + 1  # the timed-out wait, ~0.2 s
    finally:
        engine.dispose()


def test_job_last_success_is_read_from_job_runs_at_the_first_scrape(settings, engine, admin):
    from api.app import create_app

    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO job_runs (job, started_at, finished_at, status) VALUES "
            "('reconcile', now() - interval '2 h', now() - interval '2 h', 'succeeded'), "
            "('reconcile', now() - interval '1 h', now() - interval '1 h', 'succeeded'), "
            "('reconcile', now() - interval '1 m', now() - interval '1 m', 'failed')"
        )
    app = create_app(settings, engine=engine)
    try:
        scraped = parse(app.test_client().get("/metrics", headers=admin).get_data(as_text=True))
    finally:
        app.extensions["nexmdm"].close()
    seeded = scraped.value("nexmdm_job_last_success_timestamp_seconds", job_name="reconcile")
    assert abs(seeded - (time.time() - 3600)) < 60


def test_create_app_makes_no_database_connection(settings, engine):
    """create_app reads nothing: it used to read job_runs (a connection from the pool at start-up)."""
    from sqlalchemy import event

    from api.app import create_app

    connects: list[object] = []

    def count(*_: object) -> None:
        connects.append(1)

    engine.dispose()  # no pooled connection left from other tests: any checkout would connect
    event.listen(engine, "connect", count)
    event.listen(engine, "checkout", count)
    try:
        app = create_app(settings, engine=engine)
        app.extensions["nexmdm"].close()
    finally:
        event.remove(engine, "connect", count)
        event.remove(engine, "checkout", count)
    assert connects == []


def test_create_app_with_the_database_down_returns_an_app_at_once(settings, tmp_path):
    """No database at start-up: the app is built (and says 503 until the database is back)."""
    import socket

    from api.app import create_app

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = settings.with_overrides(database_url=f"postgresql://nexmdm:x@127.0.0.1:{port}/nexmdm")
    started = time.perf_counter()
    app = create_app(down)
    try:
        assert time.perf_counter() - started < 2.0
        assert app.test_client().get("/readyz").status_code == 503
    finally:
        app.extensions["nexmdm"].close()
        app.extensions["nexmdm"].engine.dispose()


def test_a_job_run_outside_the_app_is_not_counted_by_it(app, engine):
    """Only the runs an app reports to its JobMetrics count in it: before, creating an app added
    a listener to a module-level list, and every run in the process counted from then on."""
    from scheduler.locking import JobOutcome, run_locked

    before = sample("nexmdm_job_runs_total", job_name="unit-outside", outcome="succeeded")
    report = run_locked(engine, "unit-outside", lambda: JobOutcome(1))
    assert report.status == "succeeded"
    assert sample("nexmdm_job_runs_total", job_name="unit-outside", outcome="succeeded") == before


def test_job_runs_through_the_ops_endpoint_are_counted(client, admin):
    runs = sample("nexmdm_job_runs_total", job_name="partitions", outcome="succeeded")
    durations = sample("nexmdm_job_duration_seconds_count", job_name="partitions")
    assert client.post("/ops/partitions", headers=admin).status_code == 200
    assert sample("nexmdm_job_runs_total", job_name="partitions", outcome="succeeded") == runs + 1
    assert sample("nexmdm_job_duration_seconds_count", job_name="partitions") == durations + 1
    assert abs(sample("nexmdm_job_last_success_timestamp_seconds", job_name="partitions") - time.time()) < 30


def test_a_scrape_rereads_job_successes_made_elsewhere(app, client, admin, engine):
    client.get("/metrics", headers=admin)
    with engine.begin() as conn:  # a run by another process (python -m scheduler, another replica)
        conn.exec_driver_sql(
            "INSERT INTO job_runs (job, started_at, finished_at, status) "
            "VALUES ('elsewhere', now() - interval '5 s', now(), 'succeeded')"
        )
    client.get("/metrics", headers=admin)
    assert sample("nexmdm_job_last_success_timestamp_seconds", job_name="elsewhere") == 0  # within the minute
    app.extensions["nexmdm"].job_metrics.reread_s = 0.0
    scraped = parse(client.get("/metrics", headers=admin).get_data(as_text=True))
    assert abs(scraped.value("nexmdm_job_last_success_timestamp_seconds", job_name="elsewhere") - time.time()) < 30


HB = "nexmdm_heartbeat_write_duration_seconds"


def _enroll(url: str, n: int, prefix: str) -> list[dict]:
    status, body = call(url + "/v1/devices/enroll", "POST",
                        {"devices": [{"device_uid": f"{prefix}-{i}"} for i in range(n)]}, {"x-admin": ADMIN_KEY})
    assert status == 201, body
    return body["devices"]


def _heartbeat(url: str, token: str, body: dict) -> tuple[int, dict]:
    return call(url + "/v1/heartbeat", "POST", body, {"Authorization": f"Bearer {token}"})


def _per_worker_counter(metrics_dir: Path, name: str) -> dict[str, float]:
    """Each worker's own value of an unlabelled counter, read from its file."""
    out = {}
    for path in metrics_dir.glob("counter_*.db"):
        for family in MultiProcessCollector.merge([str(path)]):
            for sample in family.samples:
                if sample.name == name:
                    out[path.stem.split("_")[1]] = sample.value
    return out


def _timed_heartbeats(url: str, jobs: list[tuple[str, dict]]) -> list[float]:
    """Send heartbeats one after another over one keep-alive connection; client latencies (s).

    Requests are encoded before the clock starts and the client is a bare socket, so what the
    client adds to the server's time stays well under a millisecond."""
    parsed = urllib.parse.urlsplit(url)
    requests = []
    for token, body in jobs:
        payload = json.dumps(body).encode()
        requests.append(
            f"POST /v1/heartbeat HTTP/1.1\r\nHost: {parsed.netloc}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
    latencies = []
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = sock.makefile("rb")
        for request in requests:
            started = time.perf_counter()
            sock.sendall(request)
            status = stream.readline()
            length = 0
            while (line := stream.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            stream.read(length)
            latencies.append(time.perf_counter() - started)
            assert status.split()[1] == b"200", status
    return latencies


def test_one_scrape_covers_every_worker_and_the_histogram_matches_the_client(database_url, engine, tmp_path):
    with engine.begin() as conn:  # a past success, which the workers seed their gauge from
        conn.exec_driver_sql(
            "INSERT INTO job_runs (job, started_at, finished_at, status) "
            "VALUES ('partitions', now() - interval '61 s', now() - interval '60 s', 'succeeded')"
        )
    # No scheduler: its start-up partitions run would overwrite the seeded time.
    server = start_server(database_url, ADMIN_KEY, tmp_path, workers=2, SCHEDULER_ENABLED="false")
    try:
        url, admin_url = server.url, server.admin_url  # device plane (2 workers), operator plane (1)
        devices = _enroll(admin_url, 60, "obs")
        now = datetime.now(UTC)
        # Three distinct 10 s buckets per device: 180 stored, over many new connections.
        jobs = [(d["token"], heartbeat_body(now - timedelta(seconds=20 * k))) for k in range(3) for d in devices]
        with ThreadPoolExecutor(max_workers=24) as pool:
            results = list(pool.map(lambda j: _heartbeat(url, *j), jobs))
            dups = list(pool.map(lambda j: _heartbeat(url, *j), jobs[:20]))
            bad_token = list(pool.map(lambda _: _heartbeat(url, "not-a-token", heartbeat_body()), range(4)))
            invalid = list(pool.map(lambda d: _heartbeat(url, d["token"], heartbeat_body(battery_pct=500)),
                                    devices[:3]))
        assert all(code == 200 and body["status"] == "stored" for code, body in results)
        assert all(code == 200 and body["status"] == "duplicate" for code, body in dups)
        assert all(code == 401 for code, _ in bad_token) and all(code == 422 for code, _ in invalid)
        for d in devices[:5]:
            assert call(f"{admin_url}/v1/devices/{d['id']}", headers={"x-admin": ADMIN_KEY})[0] == 200
        assert call(f"{admin_url}/v1/devices?limit=10", headers={"x-admin": ADMIN_KEY})[0] == 200
        assert call(f"{admin_url}/v1/fleet/summary", headers={"x-admin": ADMIN_KEY})[0] == 200

        # One scrape of the operator plane covers the device plane's workers too.
        m = scrape(admin_url, ADMIN_KEY)
        assert m.total("nexmdm_worker_processes") == 3
        assert m.value("nexmdm_heartbeats_accepted_total") == 180
        assert m.value("nexmdm_heartbeats_duplicate_total") == 20
        assert m.value("nexmdm_heartbeats_rejected_total", reason="token_invalid") == 4
        assert m.value("nexmdm_heartbeats_rejected_total", reason="validation_failed") == 3
        assert m.value(HB + "_count") == 200
        assert m.value("nexmdm_ingest_flush_rows_sum") == 200
        assert m.value("nexmdm_last_status_read_duration_seconds_count", query="device") == 5
        assert m.value("nexmdm_last_status_read_duration_seconds_count", query="list") == 1
        assert m.total("nexmdm_db_pool_size_connections") == 150  # 3 workers x DB_POOL_SIZE 50
        assert m.value("nexmdm_job_runs_total", job_name="nightly", outcome="failed") == 0
        seeded = m.value("nexmdm_job_last_success_timestamp_seconds", job_name="partitions")
        assert abs(seeded - (time.time() - 60)) < 30
        # The whole count came from both device-plane workers: each one's own file holds part of it.
        per_worker = _per_worker_counter(server.metrics_dir, "nexmdm_heartbeats_accepted_total")
        assert len([v for v in per_worker.values() if v > 0]) == 2, per_worker
        assert sum(per_worker.values()) == 180
        # Only bounded labels (request metrics are grouped by endpoint, not by path): no device id.
        label_names = {name for _, labels in m.samples for name, _ in labels}
        bounded = {"reason", "query", "job_name", "outcome", "endpoint", "method", "status", "le", "version", "plane",
                   "type",  # type: the closed set of event types (db.events.EVENT_TYPES)
                   "pid"}  # pid: each live worker's process figures; a dead worker's are dropped
        assert label_names <= bounded, label_names - bounded
        pids = {dict(labels)["pid"] for name, labels in m.samples if name == "nexmdm_process_resident_memory_bytes"}
        assert 0 < len(pids) <= 3 + 1, pids  # the workers of both planes, no more
        assert m.value("nexmdm_http_request_duration_seconds_count",
                       endpoint="devices.device_status", method="GET", status="200") == 5

        # Percentiles from the buckets agree with what the client saw, within a bucket width.
        before = m.buckets(HB)
        more = [(d["token"], heartbeat_body(now - timedelta(seconds=60 + 20 * k))) for k in range(5) for d in devices]
        client = _timed_heartbeats(url, more)
        after = scrape(admin_url, ADMIN_KEY)
        delta = bucket_delta(after.buckets(HB), before)
        assert delta[-1][1] == len(client) == 300
        # The client also sees what happens outside the handler (HTTP parsing, the loopback, its
        # own socket calls): a near-constant offset, measured exactly as the difference of the
        # means (_sum/_count is exact). Without it, the distributions must agree within a bucket.
        server_mean = (after.value(HB + "_sum") - m.value(HB + "_sum")) / len(client)
        offset = sum(client) / len(client) - server_mean
        assert 0 <= offset < 0.005, offset
        for q in (0.5, 0.95):
            client_q = nearest_rank(client, q) - offset
            server_q = histogram_quantile(q, delta)
            lower, upper = bucket_around(client_q, list(LATENCY_BUCKETS_S))
            assert abs(server_q - client_q) <= upper - lower, (q, server_q, client_q, offset, (lower, upper))
    finally:
        server.stop()


def _pool_health(url: str) -> dict:
    status, body = call(url + "/ops/pool_health", headers={"x-admin": ADMIN_KEY})
    assert status == 200, body
    return body


def _monitor(url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "api.pool_monitor", "--url", url, "--admin-key", ADMIN_KEY],
        cwd=ROOT, capture_output=True, text=True, timeout=30, env=dict(os.environ, ADMIN_KEY=""),
    )


def _until(predicate, timeout_s: float = 8.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_pool_gauges_rise_under_load_and_fall_after(database_url, engine, tmp_path):
    server = start_server(database_url, ADMIN_KEY, tmp_path, workers=2, SCHEDULER_ENABLED="false",
                          DB_POOL_SIZE="2", DB_MAX_OVERFLOW="1", DB_POOL_TIMEOUT_S="1")
    admin = {"x-admin": ADMIN_KEY}
    try:
        # Everything here is the operator plane's (its one worker serves the status reads); the
        # figures cover the device plane's two workers as well.
        url = server.admin_url
        # No heartbeats here: each ingest flusher keeps a connection checked out once it has
        # written, which would lift the idle baseline above zero.
        devices = _enroll(url, 24, "pool")
        idle = _until(lambda: (h := _pool_health(url))["in_use"] == 0 and h)
        assert idle["status"] == "OK" and idle["workers"] == 3
        assert idle["pool_size"] == 6 and idle["capacity"] == 9
        # Both planes' pools, each on its own: two device workers, one operator worker.
        planes = idle["planes"]
        assert set(planes) == {"device", "operator"}
        assert (planes["device"]["workers"], planes["device"]["capacity"]) == (2, 6)
        assert (planes["operator"]["workers"], planes["operator"]["capacity"]) == (1, 3)
        assert idle["postgres"]["max_connections"] == 600
        pg = idle["postgres"]
        assert pg["headroom"] == 600 - pg["reserved_connections"] - pg["in_use"]
        assert _monitor(url).returncode == 0

        # Hold every status read on a lock: each one keeps its pooled connection meanwhile.
        with engine.connect() as locker:
            locker.exec_driver_sql("LOCK TABLE device_last_status IN ACCESS EXCLUSIVE MODE")
            results: list[int] = []
            threads = [threading.Thread(target=lambda d=d: results.append(
                call(f"{url}/v1/devices/{d['id']}", headers=admin)[0])) for d in devices]
            for t in threads:
                t.start()
            busy = _until(lambda: (h := _pool_health(url))["busiest_worker_utilization_pct"] == 100 and h)
            assert busy, "no worker's pool filled up"
            assert busy["status"] == "CRITICAL" and busy["in_use"] >= 3
            # The reads fill the operator plane's pool; the device plane's stays free.
            assert busy["planes"]["operator"]["busiest_worker_utilization_pct"] == 100
            assert busy["planes"]["device"]["in_use"] == 0
            assert "of the operator plane" in busy["reasons"][0]
            monitor = _monitor(url)
            assert monitor.returncode == 2 and "CRITICAL" in monitor.stdout, monitor.stdout + monitor.stderr
            m = scrape(url, ADMIN_KEY)
            assert m.total("nexmdm_db_pool_checked_out_connections") >= 3
            assert m.value("nexmdm_db_pool_utilization_ratio", plane="operator") == 1.0
            # Requests beyond the pools' capacity give up after DB_POOL_TIMEOUT_S.
            timeouts = _until(lambda: scrape(url, ADMIN_KEY).value("nexmdm_db_pool_checkout_timeouts_total"))
            assert timeouts >= 1
            locker.rollback()
        for t in threads:
            t.join(timeout=20)
        assert set(results) <= {200, 503} and results.count(200) >= 3

        after = _until(lambda: (h := _pool_health(url))["in_use"] == 0 and h)
        assert after and after["status"] == "OK"
        m = scrape(url, ADMIN_KEY)
        assert m.total("nexmdm_db_pool_checked_out_connections") == 0
        assert m.total("nexmdm_db_pool_utilization_ratio") == 0
        waits = m.buckets("nexmdm_db_pool_checkout_wait_seconds")
        assert dict(waits)[float("inf")] - dict(waits)[0.5] >= timeouts  # the timed-out waits lasted ~1 s
        assert _monitor(url).returncode == 0

        # A killed worker's live gauges go (child_exit); its counters and histograms stay counted.
        reads = m.value("nexmdm_last_status_read_duration_seconds_count", query="device")
        assert reads == results.count(200)
        victim = psutil.Process(server.proc.pid).children()[0].pid
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:  # the victim's live gauges removed, its successor's written
            pids = {p.stem.rsplit("_", 1)[1] for p in server.metrics_dir.glob("gauge_livesum_*.db")}
            return str(victim) not in pids and live_workers(server.metrics_dir) == 3

        assert _until(replaced, 15), server.log()[-2000:]
        m = scrape(url, ADMIN_KEY)
        assert m.total("nexmdm_worker_processes") == 3
        assert m.total("nexmdm_db_pool_size_connections") == 6
        assert m.value("nexmdm_last_status_read_duration_seconds_count", query="device") == reads
    finally:
        server.stop()
