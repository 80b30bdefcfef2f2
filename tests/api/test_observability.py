"""/metrics, /ops/pool_health and the metered pool in one process (Flask test client, real DB)."""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api.metrics import MeteredQueuePool
from db.engine import make_engine
from tests.support.helpers import bearer, enroll, heartbeat_body
from tests.support.metrics_scrape import parse


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
