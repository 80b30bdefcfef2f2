"""nightly archive (export, SHA-256, read-back, drop) and restore, against a real PostgreSQL."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from config.settings import PROJECT_ROOT
from db.partitions import list_partitions, partition_name
from scheduler.jobs.archive import Manifest, RestoreRefused, restore_archive
from scheduler.service import run_job
from tests.support.jobdata import fill_day, make_devices, scalar

TODAY = datetime.now(UTC).date()


def nightly(engine, settings, now: datetime):
    return run_job("nightly", engine, settings, now=now, progress=lambda line: None)


def attached(engine) -> set[str]:
    with engine.connect() as conn:
        names = list_partitions(conn)
        conn.rollback()
    return names


@pytest.fixture
def old_days(engine):
    """Four days of heartbeats 100..97 days ago, for 5 devices, 3 heartbeats each per day."""
    devices = make_devices(engine, 5)
    days = [TODAY - timedelta(days=n) for n in (100, 99, 98, 97)]
    counts = {day: fill_day(engine, day, devices) for day in days}
    return devices, days, counts


def test_nightly_over_several_days_with_injected_clock_then_restore_and_read_back(engine, settings, client, admin,
                                                                                  old_days):
    devices, days, counts = old_days
    settings = settings.with_overrides(retention_days=90, archive_format="copy")
    now = datetime.now(UTC)

    # The clock says it is 8 days ago: only the two oldest days are past retention.
    report = nightly(engine, settings, now - timedelta(days=8))
    assert report.status == "succeeded", report.error
    assert [a["partition"] for a in report.detail["archived"]] == [partition_name(d) for d in days[:2]]
    assert report.rows_affected == counts[days[0]] + counts[days[1]]
    left = attached(engine)
    assert partition_name(days[0]) not in left and partition_name(days[2]) in left

    # The clock moves on: the other two go too; running again finds nothing more to do.
    assert nightly(engine, settings, now).rows_affected == counts[days[2]] + counts[days[3]]
    again = nightly(engine, settings, now)
    assert again.status == "succeeded" and again.detail["archived"] == [] and again.rows_affected == 0
    assert not {partition_name(d) for d in days} & attached(engine)

    # Every archive has a verified manifest and is recorded in hb_partitions.
    for day in days:
        name = partition_name(day)
        manifest = Manifest.load(settings.archive_dir / f"{name}.manifest.json")
        assert manifest.row_count == counts[day] and len(manifest.sha256) == 64
        with engine.connect() as conn:
            state, rows, sha = conn.exec_driver_sql(
                "SELECT state, row_count, sha256 FROM hb_partitions WHERE name = %(n)s", {"n": name}).one()
        assert (state, rows, sha) == ("archived", counts[day], manifest.sha256)

    # Nothing of day 2 is readable now ...
    since, until = datetime(*days[1].timetuple()[:3], tzinfo=UTC), datetime(*days[1].timetuple()[:3], tzinfo=UTC)
    until += timedelta(days=1)
    params = {"since": since.isoformat(), "until": until.isoformat()}
    history = client.get(f"/v1/devices/{devices[1]}/heartbeats", query_string=params, headers=admin)
    assert history.status_code == 200 and history.get_json()["heartbeats"] == []

    # ... until it is restored; then the history endpoint reads it again, byte for byte.
    manifest_path = settings.archive_dir / f"{partition_name(days[1])}.manifest.json"
    outcome = restore_archive(engine, manifest_path, progress=lambda line: None)
    assert outcome.rows_affected == counts[days[1]]
    history = client.get(f"/v1/devices/{devices[1]}/heartbeats", query_string=params, headers=admin).get_json()
    assert len(history["heartbeats"]) == 3
    assert history["heartbeats"][0]["extra"] == {"note": "tab\there\nnewline \\ é"}
    assert scalar(engine, "SELECT state FROM hb_partitions WHERE name = %(n)s",
                  {"n": partition_name(days[1])}) == "restored"

    # A restored partition is kept RESTORE_KEEP_DAYS, then archived again (to the same bytes).
    assert nightly(engine, settings, now + timedelta(days=1)).detail["archived"] == []
    rearchived = nightly(engine, settings, now + timedelta(days=settings.restore_keep_days + 1))
    assert [a["partition"] for a in rearchived.detail["archived"]] == [partition_name(days[1])]
    assert rearchived.detail["archived"][0]["sha256"] == Manifest.load(manifest_path).sha256 == outcome.detail["sha256"]


def test_tampered_or_truncated_archive_is_refused_and_nothing_changes(engine, settings, old_days):
    _, days, _ = old_days
    settings = settings.with_overrides(retention_days=90, archive_format="copy")
    assert nightly(engine, settings, datetime.now(UTC)).status == "succeeded"
    name = partition_name(days[0])
    manifest_path = settings.archive_dir / f"{name}.manifest.json"
    data = settings.archive_dir / f"{name}.copy.gz"
    original = data.read_bytes()

    # Tampered: same length, one row changed, recompressed so gzip itself is happy.
    text = gzip.decompress(original).replace(b"\t1.0.0\t", b"\t6.6.6\t", 1)
    data.write_bytes(gzip.compress(text, mtime=0))
    with pytest.raises(RestoreRefused, match="SHA-256|bytes"):
        restore_archive(engine, manifest_path, progress=lambda line: None)

    # Truncated.
    data.write_bytes(original[: len(original) // 2])
    with pytest.raises(RestoreRefused, match="truncated or altered"):
        restore_archive(engine, manifest_path, progress=lambda line: None)

    assert name not in attached(engine)
    assert scalar(engine, "SELECT to_regclass(%(n)s)::text", {"n": name}) is None
    assert scalar(engine, "SELECT state FROM hb_partitions WHERE name = %(n)s", {"n": name}) == "archived"

    # The CLI says so too, with exit code 1; with the file put back it restores.
    cli = [sys.executable, "-m", "scheduler", "restore", str(manifest_path)]
    env = {"DATABASE_URL": settings.database_url, "PATH": "/usr/bin:/bin"}
    refused = subprocess.run(cli, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "refusing to restore" in refused.stdout
    verify = subprocess.run([sys.executable, "-m", "scheduler", "verify", str(manifest_path)], cwd=PROJECT_ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 1 and "NOT OK" in verify.stdout
    data.write_bytes(original)
    restored = subprocess.run(cli, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert name in attached(engine)


def test_archive_that_cannot_be_written_never_drops_the_partition(engine, settings, old_days):
    _, days, counts = old_days
    blocker = Path(settings.var_dir) / "not-a-dir"
    blocker.write_text("a file where the archive directory should be")
    settings = settings.with_overrides(retention_days=90, archive_format="copy", archive_dir=blocker)
    report = nightly(engine, settings, datetime.now(UTC))
    assert report.status == "failed"
    assert len(report.detail["failed"]) == 4 and report.detail["archived"] == []
    assert {partition_name(d) for d in days} <= attached(engine)
    assert scalar(engine, f"SELECT count(*) FROM {partition_name(days[0])}") == counts[days[0]]
    assert scalar(engine, "SELECT count(*) FROM hb_partitions WHERE state = 'archived'") == 0


def test_restore_refuses_when_the_partition_exists(engine, settings, old_days):
    _, days, _ = old_days
    settings = settings.with_overrides(retention_days=90, archive_format="copy")
    nightly(engine, settings, datetime.now(UTC))
    manifest_path = settings.archive_dir / f"{partition_name(days[0])}.manifest.json"
    restore_archive(engine, manifest_path, progress=lambda line: None)
    with pytest.raises(RestoreRefused, match="exists already"):
        restore_archive(engine, manifest_path, progress=lambda line: None)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["schema_version"] and manifest["columns"][0] == "device_id"


def test_copy_is_refused_under_psycogreen_which_is_why_export_runs_in_a_child(engine, settings, old_days):
    """In a gevent + psycogreen process (as in each API worker) psycopg2's COPY raises; the
    export says so clearly instead of half-writing a file."""
    _, days, _ = old_days
    script = (
        "from gevent import monkey; monkey.patch_all()\n"
        "from psycogreen.gevent import patch_psycopg; patch_psycopg()\n"
        "import sys, psycopg2\n"
        "from pathlib import Path\n"
        "from scheduler.jobs.archive import ArchiveError, export_partition\n"
        "conn = psycopg2.connect(sys.argv[1]); cur = conn.cursor()\n"
        "try:\n"
        "    cur.copy_expert('COPY (SELECT 1) TO STDOUT', sys.stdout)\n"
        "except psycopg2.ProgrammingError as exc:\n"
        "    print('copy raised:', exc)\n"
        "try:\n"
        "    export_partition(sys.argv[1], sys.argv[2], Path(sys.argv[3]), gzip_level=1,\n"
        "                     statement_timeout_ms=1000, progress=print)\n"
        "except ArchiveError as exc:\n"
        "    print('export refused:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, settings.database_url, partition_name(days[0]),
                          str(settings.archive_dir)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert "copy raised:" in out.stdout and "export refused:" in out.stdout, out.stdout + out.stderr
    assert not settings.archive_dir.exists() or not any(settings.archive_dir.iterdir())


def test_partition_that_changed_after_export_or_is_busy_is_not_dropped(engine, settings, old_days):
    from sqlalchemy.exc import OperationalError

    from scheduler.jobs.archive import ArchiveError, drop_archived_partition, dsn_of, export_in_child
    from tests.support.jobdata import row

    devices, days, counts = old_days
    name = partition_name(days[0])
    [(_, manifest)] = list(export_in_child(dsn_of(engine), [name], settings, progress=lambda line: None))
    assert isinstance(manifest, Manifest) and manifest.row_count == counts[days[0]]
    path = settings.archive_dir / manifest.file

    # Busy: a transaction holds a lock on heartbeats; the drop gives up after its lock_timeout.
    with engine.connect() as reader:
        reader.exec_driver_sql("SELECT count(*) FROM heartbeats")
        with pytest.raises(OperationalError, match="lock timeout"):
            drop_archived_partition(engine, manifest, path, settings, attempts=1, lock_timeout_s=0.3)
        reader.rollback()
    assert name in attached(engine)

    # Changed: a row arrived after the export; the counts differ and nothing is dropped.
    from db.heartbeats import insert_heartbeats

    with engine.begin() as conn:
        insert_heartbeats(conn, [row(devices[0], datetime(*days[0].timetuple()[:3], 23, tzinfo=UTC))])
    with pytest.raises(ArchiveError, match="not dropped"):
        drop_archived_partition(engine, manifest, path, settings)
    assert name in attached(engine)
    assert scalar(engine, f"SELECT count(*) FROM {name}") == counts[days[0]] + 1
    assert scalar(engine, "SELECT count(*) FROM hb_partitions WHERE state = 'archived'") == 0
