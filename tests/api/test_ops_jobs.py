"""POST /ops/partitions|nightly|reconcile and GET /ops/jobs (admin)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from db.partitions import partition_name
from scheduler.locking import lock_name
from tests.support.jobdata import fill_day, make_devices


def test_ops_run_jobs_and_list_them(client, admin, engine):
    for job in ("partitions", "reconcile", "nightly"):
        resp = client.post(f"/ops/{job}", headers=admin)
        assert resp.status_code == 200, resp.get_json()
        body = resp.get_json()
        assert body["job"] == job and body["status"] == "succeeded" and body["trigger"] == "api"
    runs = client.get("/ops/jobs", headers=admin).get_json()["runs"]
    assert [r["job"] for r in runs] == ["nightly", "reconcile", "partitions"]
    assert all(r["status"] == "succeeded" and r["duration_s"] >= 0 for r in runs)
    only = client.get("/ops/jobs?job=reconcile&limit=1", headers=admin).get_json()["runs"]
    assert [r["job"] for r in only] == ["reconcile"]


def test_ops_answer_409_while_another_runner_holds_the_lock(client, admin, engine):
    with engine.connect() as holder:
        holder.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext(%(k)s))", {"k": lock_name("nightly")})
        resp = client.post("/ops/nightly", headers=admin)
        holder.rollback()
    assert resp.status_code == 409
    body = resp.get_json()
    assert body["error"] == "already_running" and body["detail"]["status"] == "skipped"
    assert client.post("/ops/nightly", headers=admin).status_code == 200


def test_ops_nightly_archives_old_partitions(client, admin, engine, settings):
    devices = make_devices(engine, 3)
    old = datetime.now(UTC).date() - timedelta(days=settings.hot_days + 2)  # cold, inside RETENTION_DAYS
    rows = fill_day(engine, old, devices)
    body = client.post("/ops/nightly", headers=admin).get_json()
    assert body["rows_affected"] == rows
    assert body["detail"]["archived"][0]["partition"] == partition_name(old)
    assert (settings.archive_dir / f"{partition_name(old)}.manifest.json").exists()
    assert (settings.archive_dir / f"{partition_name(old)}.parquet").exists()


def test_ops_need_the_admin_key_and_valid_parameters(client, admin):
    assert client.post("/ops/nightly").status_code == 401
    assert client.get("/ops/jobs", headers={"x-admin": "wrong"}).status_code == 403
    bad = client.get("/ops/jobs?job=nope", headers=admin)
    assert bad.status_code == 400 and bad.get_json()["error"] == "invalid_parameter"
    assert client.get("/ops/jobs?limit=0", headers=admin).status_code == 400


def test_openapi_lists_the_ops_endpoints(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    for path in ("/ops/partitions", "/ops/nightly", "/ops/reconcile"):
        assert "409" in paths[path]["post"]["responses"]
    assert "JobRunList" in paths["/ops/jobs"]["get"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"]
