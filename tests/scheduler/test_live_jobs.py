"""Jobs inside the real server (gunicorn, gevent workers, psycogreen): the scheduler in each
worker, the nightly archive's COPY (which psycopg2 refuses under psycogreen in-process) into
Parquet, and history read back from those files through DuckDB inside the worker."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from db.partitions import list_partitions, partition_name
from scheduler.jobs.archive import Manifest, verify_archive
from tests.support.jobdata import fill_day, make_devices, scalar
from tests.support.live import call


def test_nightly_and_reconcile_inside_the_gevent_server(engine, tmp_path):
    from tests.conftest import ADMIN_KEY
    from tests.support.live import start_server

    devices = make_devices(engine, 4)
    days = [datetime.now(UTC).date() - timedelta(days=n) for n in (20, 19)]
    counts = [fill_day(engine, day, devices) for day in days]
    fill_day(engine, datetime.now(UTC).date(), devices[:1], per_device=1)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM device_last_status WHERE device_id = %(d)s", {"d": devices[0]})

    server = start_server(str(engine.url.render_as_string(hide_password=False)).replace("+psycopg2", ""),
                          ADMIN_KEY, tmp_path, workers=2, admin_workers=2, RETENTION_DAYS="30")
    try:
        admin = {"x-admin": ADMIN_KEY}
        since = datetime(*days[0].timetuple()[:3], tzinfo=UTC).isoformat().replace("+00:00", "Z")
        until = datetime.now(UTC).date().isoformat() + "T00:00:00Z"
        history_url = f"{server.admin_url}/v1/devices/{devices[1]}/heartbeats?since={since}&until={until}&limit=5"
        status, hot_history = call(history_url, headers=admin)
        assert status == 200 and len(hot_history["heartbeats"]) == 5
        # Each operator-plane worker started a scheduler and ran the partitions job at start-up:
        # one ran, one skipped (the device plane runs none).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and scalar(engine, "SELECT count(*) FROM job_runs "
                                                             "WHERE job = 'partitions' AND status <> 'running'") < 2:
            time.sleep(0.2)
        status, listed = call(server.admin_url + "/ops/jobs?job=partitions", headers=admin)
        assert status == 200
        succeeded = [r for r in listed["runs"] if r["status"] == "succeeded"]
        assert len(listed["runs"]) == 2 and succeeded, listed
        # Two successes only if the workers started on either side of an hour boundary.
        assert len({r["detail"]["period"] for r in succeeded}) == len(succeeded), listed
        assert {r["trigger"] for r in listed["runs"]} == {"schedule"}

        status, report = call(server.admin_url + "/ops/nightly", "POST", headers=admin)
        assert status == 200, (report, server.log()[-2000:])
        assert report["status"] == "succeeded" and report["rows_affected"] == sum(counts)
        assert [a["partition"] for a in report["detail"]["archived"]] == [partition_name(d) for d in days]
        for day, rows in zip(days, counts, strict=True):
            manifest = Manifest.load(tmp_path / "archive" / f"{partition_name(day)}.manifest.json")
            verify_archive(tmp_path / "archive" / manifest.file, manifest.sha256, rows, manifest.size_bytes)
        with engine.connect() as conn:
            assert not {partition_name(d) for d in days} & list_partitions(conn)
        assert report["detail"]["format"] == "parquet" and manifest.format == "parquet"
        # The same history, now read from the Parquet files by DuckDB in a gevent worker's thread pool.
        status, cold_history = call(history_url, headers=admin)
        assert status == 200, (cold_history, server.log()[-2000:])
        assert cold_history == hot_history

        status, healed = call(server.admin_url + "/ops/reconcile", "POST", headers=admin)
        assert status == 200 and (healed["detail"]["inserted"], healed["detail"]["updated"]) == (1, 0)
        status, health = call(server.url + "/readyz")
        assert status == 200
    finally:
        server.stop()
