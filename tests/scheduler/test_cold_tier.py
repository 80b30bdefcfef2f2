"""The cold tier: nightly writes days past HOT_DAYS as Parquet, verified against the source;
history reads both tiers as one; files past RETENTION_DAYS are deleted; a changed or truncated
file is refused on read and by verify; restore brings a Parquet day back."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

import msgspec
import pyarrow.parquet as pq
import pytest

from config.settings import PROJECT_ROOT
from db.heartbeats import HeartbeatRow, insert_heartbeats
from db.partitions import ensure_partitions, list_partitions, partition_name
from scheduler.jobs.archive import Manifest, restore_archive
from scheduler.service import run_job
from tests.support.jobdata import make_devices, scalar

TODAY = datetime.now(UTC).date()


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def fill(engine, day: date, devices: list[int], per_device: int) -> int:
    """Heartbeats with the awkward values: null signal, skews like 0.005 and -1.234, JSON extra
    with tabs, newlines, quotes and non-ASCII, an empty string, a received_at past midnight."""
    rows = []
    for dev in devices:
        for k in range(per_device):
            bucket = _midnight(day) + timedelta(minutes=7 * k, seconds=10 * (dev % 6))
            rows.append(HeartbeatRow(
                device_id=dev, bucket_ts=bucket, sent_at=bucket + timedelta(milliseconds=1234 + k),
                received_at=bucket + timedelta(days=1 if k == per_device - 1 else 0, microseconds=5678 + 17 * k),
                clock_skew_s=(0.005, -1.234, 0.1, 299.999)[k % 4], battery_pct=(dev * 7 + k) % 101,
                charging=k % 3 == 0, network_type=("wifi", "cellular", "ethernet")[k % 3],
                signal_dbm=None if k % 3 == 2 else -60 - k % 40, app_version=f"2.{dev % 3}.{k % 2}",
                os_version="" if k == 1 else "14", uptime_s=10**9 + 60 * k, free_storage_mb=64_000 - k,
                # an object, and (k == 2) a bare JSON string, which must come back a string
                extra_json=None if k % 2 else msgspec.Raw(
                    b'"just a string"' if k == 2
                    else f'{{"note": "tab\\there \\"q\\" é {k}", "n": [1, 2.5, null]}}'.encode()),
            ))
    with engine.begin() as conn:
        ensure_partitions(conn, day, 0)
        insert_heartbeats(conn, rows)
    return len(rows)


def nightly(engine, settings, now: datetime | None = None):
    return run_job("nightly", engine, settings, now=now or datetime.now(UTC), progress=lambda line: None)


def history(client, admin, device: int, since: datetime, until: datetime, **params) -> dict:
    answer = client.get(f"/v1/devices/{device}/heartbeats", headers=admin,
                        query_string={"since": since.isoformat(), "until": until.isoformat(), **params})
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def all_pages(client, admin, device: int, since: datetime, until: datetime, **params) -> list[dict]:
    rows: list[dict] = []
    pages = 0
    while True:
        page = history(client, admin, device, since, until, **params)
        rows += page["heartbeats"]
        pages += 1
        if page["next"] is None:
            return rows
        since = datetime.fromisoformat(page["next"]["since"])
        until = datetime.fromisoformat(page["next"]["until"])
        assert pages < 100


@pytest.fixture
def tiers(engine, settings):
    """Days 20, 19 and 16 ago (cold once nightly runs with HOT_DAYS=14) and yesterday (hot)."""
    devices = make_devices(engine, 7, prefix="cold")
    days = [TODAY - timedelta(days=n) for n in (20, 19, 16)]
    counts = {day: fill(engine, day, devices, per_device=9) for day in days}
    counts[TODAY - timedelta(days=1)] = fill(engine, TODAY - timedelta(days=1), devices, per_device=9)
    return devices, days, counts, settings.with_overrides(hot_days=14, retention_days=90)


def test_history_is_the_same_json_before_and_after_days_move_to_parquet(engine, client, admin, tiers):
    devices, days, counts, settings = tiers
    since, until = _midnight(TODAY - timedelta(days=30)), _midnight(TODAY + timedelta(days=1))
    before = {d: history(client, admin, d, since, until) for d in devices}
    before_asc = history(client, admin, devices[2], since, until, order="asc", limit=20)

    report = nightly(engine, settings)
    assert report.status == "succeeded", (report.error, report.detail)
    assert [a["partition"] for a in report.detail["archived"]] == [partition_name(d) for d in days]
    with engine.connect() as conn:
        assert not {partition_name(d) for d in days} & list_partitions(conn)
    for day in days:
        name = partition_name(day)
        manifest = Manifest.load(settings.archive_dir / f"{name}.manifest.json")
        assert (manifest.format, manifest.compression, manifest.row_count) == ("parquet", "zstd", counts[day])
        meta = pq.ParquetFile(settings.archive_dir / manifest.file).metadata
        assert meta.num_rows == counts[day]
        assert meta.row_group(0).column(0).statistics.has_min_max  # device_id statistics for pruning
        recorded = scalar(engine, "SELECT state || ' ' || archive_format || ' ' || archive_bytes FROM hb_partitions "
                                  "WHERE name = %(n)s", {"n": name})
        assert recorded == f"archived parquet {manifest.size_bytes}"

    after = {d: history(client, admin, d, since, until) for d in devices}
    assert after == before  # every field, every row, same order: the tiers are invisible
    assert len(after[devices[0]]["heartbeats"]) == 36
    assert history(client, admin, devices[2], since, until, order="asc", limit=20) == before_asc

    # One cold day alone, and a range that ends inside the cold days.
    day = days[1]
    one_day = history(client, admin, devices[3], _midnight(day), _midnight(day) + timedelta(days=1))
    assert [r["bucket_ts"] for r in one_day["heartbeats"]] == sorted(
        (r["bucket_ts"] for r in before[devices[3]]["heartbeats"] if r["bucket_ts"].startswith(day.isoformat())),
        reverse=True)
    assert len(one_day["heartbeats"]) == 9 and one_day["next"] is None


def test_pages_walk_both_tiers_in_order_each_row_once(engine, client, admin, tiers):
    devices, days, counts, settings = tiers
    assert nightly(engine, settings).status == "succeeded"
    since, until = _midnight(TODAY - timedelta(days=30)), _midnight(TODAY + timedelta(days=1))
    device = devices[4]
    whole = history(client, admin, device, since, until, limit=1000)["heartbeats"]
    assert len(whole) == 36
    stamps = [r["bucket_ts"] for r in whole]
    assert stamps == sorted(stamps, reverse=True) and len(set(stamps)) == 36

    for limit in (1, 4, 9, 10):
        assert all_pages(client, admin, device, since, until, limit=limit) == whole
        assert all_pages(client, admin, device, since, until, limit=limit, order="asc") == whole[::-1]

    bad = client.get(f"/v1/devices/{device}/heartbeats", headers=admin, query_string={"order": "sideways"})
    assert bad.status_code == 400 and bad.get_json()["error"] == "invalid_parameter"


def test_cold_files_past_retention_are_deleted_and_recorded(engine, client, admin, tiers):
    devices, days, counts, settings = tiers
    assert nightly(engine, settings).status == "succeeded"
    # With RETENTION_DAYS=19 the day 20 days ago goes; the day 19 days ago and the rest stay.
    report = nightly(engine, settings.with_overrides(retention_days=19))
    assert report.status == "succeeded", report.error
    gone = partition_name(days[0])
    assert [e["partition"] for e in report.detail["expired"]] == [gone]
    assert sorted(report.detail["expired"][0]["files_deleted"]) == [f"{gone}.manifest.json", f"{gone}.parquet"]
    assert not (settings.archive_dir / f"{gone}.parquet").exists()
    assert (settings.archive_dir / f"{partition_name(days[1])}.parquet").exists()
    assert scalar(engine, "SELECT state FROM hb_partitions WHERE name = %(n)s AND expired_at IS NOT NULL",
                  {"n": gone}) == "expired"
    recorded = scalar(engine, "SELECT detail->'expired'->0->>'partition' FROM job_runs WHERE job = 'nightly' "
                              "AND status = 'succeeded' ORDER BY id DESC LIMIT 1")
    assert recorded == gone
    since = _midnight(days[0])
    rows = history(client, admin, devices[0], since, since + timedelta(days=2))["heartbeats"]
    assert {r["bucket_ts"][:10] for r in rows} == {days[1].isoformat()}  # the expired day reads as empty


def test_changed_or_truncated_parquet_is_refused_on_read_and_by_verify_then_restored(
        engine, client, admin, tiers, tmp_path):
    devices, days, counts, settings = tiers
    assert nightly(engine, settings).status == "succeeded"
    name = partition_name(days[1])
    data = settings.archive_dir / f"{name}.parquet"
    manifest_path = settings.archive_dir / f"{name}.manifest.json"
    original = data.read_bytes()
    since, until = _midnight(days[1]), _midnight(days[1]) + timedelta(days=1)
    assert len(history(client, admin, devices[0], since, until)["heartbeats"]) == 9  # read once: now trusted

    def refused(reason: str, by_verify: bool = True) -> None:
        answer = client.get(f"/v1/devices/{devices[0]}/heartbeats", headers=admin,
                            query_string={"since": since.isoformat(), "until": until.isoformat()})
        body = answer.get_json()
        assert answer.status_code == 500 and body["error"] == "archive_corrupt", body
        assert body["detail"]["file"] == data.name and reason in body["detail"]["reason"], body
        if not by_verify:
            return
        verify = subprocess.run([sys.executable, "-m", "scheduler", "verify", str(manifest_path)],
                                cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
        assert verify.returncode == 1 and "NOT OK" in verify.stdout, verify.stdout + verify.stderr

    # Changed in place after this process trusted it: same inode, same size, and its mtime put
    # back. The ctime moved (no user can set it back), so the file is hashed again and refused.
    def overwrite_in_place(offset: int, data_bytes: bytes) -> None:
        before = data.stat()
        with open(data, "r+b") as fh:
            fh.seek(offset)
            fh.write(data_bytes)
        os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = data.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)

    middle = len(original) // 2
    overwrite_in_place(middle, bytes([original[middle] ^ 0xFF]))
    refused("SHA-256")
    overwrite_in_place(middle, original[middle:middle + 1])
    # A byte no reader decodes (the footer's created_by): DuckDB would answer, only the hash sees it.
    writer_name = original.rindex(b"parquet-cpp-arrow")
    overwrite_in_place(writer_name, b"P")
    refused("SHA-256")
    overwrite_in_place(writer_name, original[writer_name:writer_name + 1])
    assert len(history(client, admin, devices[0], since, until)["heartbeats"]) == 9  # the same bytes again: served
    # The last bytes overwritten (same size): no Parquet footer, refused before any hashing.
    overwrite_in_place(len(original) - 4, b"XXXX")
    refused("no Parquet footer")
    # Changed: one byte in the middle, same size, rewritten as a new file's content.
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0xFF
    data.write_bytes(bytes(changed))
    refused("SHA-256")
    # Truncated.
    data.write_bytes(original[: len(original) - 100])
    refused("truncated")
    # Replaced by a symlink to an intact copy elsewhere: not a regular file inside ARCHIVE_DIR.
    elsewhere = tmp_path / "elsewhere.parquet"
    elsewhere.write_bytes(original)
    data.unlink()
    data.symlink_to(elsewhere)
    refused("not a regular file", by_verify=False)  # verify's own refusal of links
    # The days around it still read (the range does not touch the bad file).
    other = _midnight(days[0])
    assert len(history(client, admin, devices[0], other, other + timedelta(days=1))["heartbeats"]) == 9

    # Put back: it reads again, verify says OK, and restore brings the day back into PostgreSQL.
    data.unlink()
    data.write_bytes(original)
    cold_json = history(client, admin, devices[0], since, until)
    ok = subprocess.run([sys.executable, "-m", "scheduler", "verify", str(manifest_path)],
                        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and f"{counts[days[1]]:,} rows" in ok.stdout, ok.stdout
    outcome = restore_archive(engine, manifest_path, progress=lambda line: None)
    assert outcome.rows_affected == counts[days[1]]
    with engine.connect() as conn:
        assert name in list_partitions(conn)
    assert scalar(engine, "SELECT state FROM hb_partitions WHERE name = %(n)s", {"n": name}) == "restored"
    data.unlink()  # history now reads the day from PostgreSQL only
    assert history(client, admin, devices[0], since, until) == cold_json


def test_an_empty_day_archives_and_reads_as_empty(engine, client, admin, settings):
    devices = make_devices(engine, 2)
    day = TODAY - timedelta(days=30)
    with engine.begin() as conn:
        ensure_partitions(conn, day, 0)
    report = nightly(engine, settings)
    assert report.status == "succeeded", (report.error, report.detail)
    assert report.detail["archived"][0]["rows"] == 0
    since = _midnight(day)
    assert history(client, admin, devices[0], since, since + timedelta(days=1))["heartbeats"] == []


def test_export_that_does_not_match_its_source_is_not_kept(engine, settings, tiers):
    import psycopg2

    from scheduler.jobs.cold_export import (
        ExportMismatch,
        copy_to_parquet,
        source_checksums,
        verify_against_source,
    )

    devices, days, counts, _ = tiers
    name, day = partition_name(days[0]), days[0]
    dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    path = settings.var_dir / "check.parquet"
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            expected = source_checksums(cur, name, day)
        assert copy_to_parquet(conn, name, path, progress=lambda line: None) == counts[day]
        conn.commit()
        with conn.cursor() as cur:
            verify_against_source(cur, name, day, path, expected, sample_rows=1000)  # equal: passes
            # A column the sums do not cover, changed in the source: the row sample sees it.
            cur.execute(f"UPDATE {name} SET network_type = 'satellite' WHERE device_id = %s "
                        "AND bucket_ts = (SELECT min(bucket_ts) FROM heartbeats WHERE device_id = %s)",
                        (devices[2], devices[2]))
            with pytest.raises(ExportMismatch, match="reads back as"):
                verify_against_source(cur, name, day, path, expected, sample_rows=1000)
            conn.rollback()
            # A row more in the source than in the file: the count and sums see it.
            cur.execute(f"DELETE FROM {name} WHERE device_id = %s", (devices[1],))
            with pytest.raises(ExportMismatch, match="read back as"):
                verify_against_source(cur, name, day, path, source_checksums(cur, name, day), sample_rows=10)
            conn.rollback()
    finally:
        conn.close()


def test_a_second_nightly_while_one_exports_is_skipped_and_each_day_is_archived_once(engine, tiers):
    import threading

    devices, days, counts, settings = tiers
    entered, release = threading.Event(), threading.Event()

    def slow_progress(line: str) -> None:
        entered.set()
        assert release.wait(20)

    first: dict = {}
    runner = threading.Thread(target=lambda: first.setdefault("report", run_job(
        "nightly", engine, settings, now=datetime.now(UTC), progress=slow_progress)))
    runner.start()
    assert entered.wait(20)  # the first run holds the lock and is inside the job
    second = nightly(engine, settings)
    release.set()
    runner.join(60)
    assert second.status == "skipped" and second.skipped_reason == "already running"
    assert first["report"].status == "succeeded", first["report"].error
    assert [a["partition"] for a in first["report"].detail["archived"]] == [partition_name(d) for d in days]
    assert scalar(engine, "SELECT count(*) FROM hb_partitions WHERE state = 'archived'") == len(days)


def test_cold_reads_open_only_the_days_in_range_and_push_the_device_filter_into_the_scan(
        engine, client, admin, tiers):
    from db.cold import ColdReader, list_cold_days

    devices, days, counts, settings = tiers
    assert nightly(engine, settings).status == "succeeded"
    since = _midnight(days[1]) + timedelta(hours=1)
    with engine.connect() as conn:
        in_range = list_cold_days(conn, since, since + timedelta(hours=2))
        everything = list_cold_days(conn, since - timedelta(days=30), since + timedelta(days=30))
        conn.rollback()
    assert [d.day for d in in_range] == [days[1]] and [d.day for d in everything] == days
    # Over the whole day (DuckDB answers a range its cached statistics rule out without a scan).
    day_start = _midnight(days[1])
    plan = ColdReader(settings.archive_dir).explain(devices[3], day_start, day_start + timedelta(days=1), in_range)
    assert "READ_PARQUET" in plan and f"device_id = {devices[3]}" in plan, plan


def test_a_trusted_file_is_hashed_once_per_process_until_its_stamp_changes(engine, client, admin, tiers, monkeypatch):
    import db.cold

    devices, days, counts, settings = tiers
    assert nightly(engine, settings).status == "succeeded"
    hashed: list[str] = []
    real = db.cold.file_sha256
    monkeypatch.setattr(db.cold, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    since = _midnight(days[1])
    for device in devices[:3]:  # three reads of one day: its file hashed the first time only
        assert len(history(client, admin, device, since, since + timedelta(days=1))["heartbeats"]) == 9
    name = f"{partition_name(days[1])}.parquet"
    assert hashed == [name]
    os.utime(settings.archive_dir / name)  # a touch: the contents may have changed, hashed again
    assert len(history(client, admin, devices[0], since, since + timedelta(days=1))["heartbeats"]) == 9
    assert hashed == [name, name]


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_days_archived_while_a_read_is_under_way_are_read_once(engine, client, admin, tiers, monkeypatch, order):
    """Nightly moves three days to Parquet in the middle of a history read: newest first, just
    after PostgreSQL was read (the rows are then in both tiers); oldest first, just before
    (the days were not cold when listed, and are gone from PostgreSQL). Every row once."""
    import db.history

    devices, days, counts, settings = tiers
    since, until = _midnight(TODAY - timedelta(days=30)), _midnight(TODAY + timedelta(days=1))
    before = history(client, admin, devices[1], since, until, order=order)
    assert len(before["heartbeats"]) == 36
    real = db.history.list_heartbeats
    moved: list[str] = []

    def hot_read_with_nightly(*args, **kwargs):
        if moved:
            return real(*args, **kwargs)
        rows = real(*args, **kwargs) if order == "desc" else None
        report = nightly(engine, settings)
        moved.extend(a["partition"] for a in report.detail["archived"])
        return rows if rows is not None else real(*args, **kwargs)

    monkeypatch.setattr(db.history, "list_heartbeats", hot_read_with_nightly)
    assert history(client, admin, devices[1], since, until, order=order) == before
    assert moved == [partition_name(d) for d in days]
