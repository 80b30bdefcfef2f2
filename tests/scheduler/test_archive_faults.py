"""nightly inside the real server when the archive directory cannot be written or fills up:
the run fails with a recorded error, the failure shows in /metrics (the JobFailed alert's
input), and no partition is dropped."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from db.partitions import list_partitions, partition_name
from tests.conftest import ADMIN_KEY
from tests.support.jobdata import fill_day, make_devices, scalar
from tests.support.live import call, start_server

FAILED_RUNS = re.compile(r'nexmdm_job_runs_total\{job_name="nightly",outcome="failed"\} (\d+)')


def _metrics(server) -> str:
    import urllib.request

    req = urllib.request.Request(server.admin_url + "/metrics", headers={"x-admin": ADMIN_KEY})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode()


def _nightly_fails_and_keeps_the_day(
    engine, tmp_path: Path, archive_dir: Path, n_devices: int, rows_per_device: int, noise: bool = False
) -> dict:
    devices = make_devices(engine, n_devices)
    day = datetime.now(UTC).date() - timedelta(days=60)  # past HOT_DAYS, inside RETENTION_DAYS
    rows = fill_day(engine, day, devices, per_device=rows_per_device, noise=noise)
    url = engine.url.render_as_string(hide_password=False).replace("+psycopg2", "")
    server = start_server(url, ADMIN_KEY, tmp_path, workers=2, RETENTION_DAYS="90",
                          ARCHIVE_DIR=str(archive_dir))
    try:
        status, body = call(server.admin_url + "/ops/nightly", "POST", {}, {"x-admin": ADMIN_KEY})
        assert status == 500 and body["error"] == "job_failed", body
        report = body["detail"]
        assert report["status"] == "failed" and report["error"]
        with engine.connect() as conn:
            assert partition_name(day) in list_partitions(conn)
        assert scalar(engine, f"SELECT count(*) FROM {partition_name(day)}") == rows
        assert scalar(engine, "SELECT count(*) FROM hb_partitions WHERE state = 'archived'") == 0
        recorded = scalar(engine, "SELECT count(*) FROM job_runs WHERE job = 'nightly' AND status = 'failed' "
                                  "AND error IS NOT NULL")
        assert recorded == 1
        failed = FAILED_RUNS.search(_metrics(server))
        assert failed and int(failed.group(1)) == 1, "nightly failure missing from /metrics"
        return report
    finally:
        server.stop()


def test_archive_directory_unwritable(engine, tmp_path):
    blocker = tmp_path / "archive-is-a-file"
    blocker.write_text("a file where the archive directory should be")
    _nightly_fails_and_keeps_the_day(engine, tmp_path, blocker, n_devices=20, rows_per_device=3)


def test_archive_directory_full(engine, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs to fill up here: {mounted.stderr.strip()}")
    try:
        # 30,000 rows with 16 random bytes each do not fit in 64 KiB even as Parquet: ENOSPC.
        report = _nightly_fails_and_keeps_the_day(engine, tmp_path, full, n_devices=2000, rows_per_device=15,
                                                  noise=True)
        assert "No space left" in str(report), report
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)
