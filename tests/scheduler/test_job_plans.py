"""The pure halves of the jobs: plans, periods, manifests."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from db.partitions import plan_partitions
from scheduler.jobs.archive import Manifest, PartitionInfo, RestoreRefused, plan_archive
from scheduler.service import period_of

TODAY = date(2026, 11, 27)
NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)


def info(days_ago: int, state: str = "active", restored_at: datetime | None = None) -> PartitionInfo:
    day = TODAY - timedelta(days=days_ago)
    return PartitionInfo(f"heartbeats_p{day:%Y%m%d}", day, state, restored_at)


def test_plan_partitions_converges():
    first = plan_partitions(set(), TODAY, 7)
    assert [p.name for p in first][:2] == ["heartbeats_p20261127", "heartbeats_p20261128"]
    assert len(first) == 8
    assert plan_partitions({p.name for p in first}, TODAY, 7) == []
    assert [p.name for p in plan_partitions({p.name for p in first}, TODAY + timedelta(days=1), 7)] == [
        "heartbeats_p20261205"]


def test_plan_archive_takes_only_days_past_retention_oldest_first():
    parts = [info(0), info(89), info(90), info(91), info(95), info(-3)]
    assert plan_archive(parts, TODAY, 90, 7, NOW) == [info(95).name, info(91).name]


def test_plan_archive_keeps_recent_restores():
    parts = [info(100, "restored", NOW - timedelta(days=2)), info(101, "restored", NOW - timedelta(days=8))]
    assert plan_archive(parts, TODAY, 90, 7, NOW) == [info(101).name]


def test_plan_archive_refuses_zero_retention():
    with pytest.raises(ValueError):
        plan_archive([info(1)], TODAY, 0, 7, NOW)


def test_periods():
    assert period_of("nightly", NOW) == "2026-11-27"
    assert period_of("reconcile", NOW + timedelta(minutes=59)) == "2026-11-27T03"
    assert period_of("partitions", NOW + timedelta(minutes=60)) == "2026-11-27T04"


def test_manifest_round_trip_and_refusals():
    m = Manifest(partition="heartbeats_p20260801", range_start="a", range_end="b", row_count=3, sha256="00",
                 size_bytes=10, file="heartbeats_p20260801.copy.gz", columns=["device_id"], schema_version="0002",
                 created_at="now")
    assert Manifest.from_json(m.to_json()) == m
    with pytest.raises(RestoreRefused, match="not a NexMDM archive manifest"):
        Manifest.from_json("{}")
    with pytest.raises(RestoreRefused, match="not a heartbeats_pYYYYMMDD"):
        Manifest.from_json(m.to_json().replace("heartbeats_p20260801\"", "devices\"", 1))
    with pytest.raises(RestoreRefused, match="must not contain a path"):
        Manifest.from_json(m.to_json().replace('"heartbeats_p20260801.copy.gz"', '"../../etc/passwd"'))


def test_jobs_are_registered_by_dotted_path_once_at_a_time():
    from apscheduler.schedulers.background import BackgroundScheduler

    from config.settings import Settings
    from scheduler.service import JOB_FUNC, add_jobs

    scheduler = BackgroundScheduler(timezone=UTC)
    add_jobs(scheduler, Settings(database_url="unused", nightly_cron="15 2 * * *"), engine=None, trigger="schedule")
    scheduler.start(paused=True)
    try:
        jobs = {job.id: job for job in scheduler.get_jobs()}
        assert set(jobs) == {"partitions", "nightly", "reconcile", "events", "webhooks"}
        dispatcher = jobs.pop("webhooks")  # not a recorded job: a pass every second that leases webhooks
        assert dispatcher.func_ref == "scheduler.jobs.webhooks:dispatch_webhooks" and dispatcher.max_instances == 1
        for job in jobs.values():
            assert job.func_ref == JOB_FUNC and job.max_instances == 1 and job.coalesce is True
        assert jobs["events"].trigger.interval == timedelta(seconds=30)
        assert jobs["nightly"].next_run_time.hour == 2 and jobs["nightly"].next_run_time.minute == 15
        # partitions also runs at start-up
        assert jobs["partitions"].next_run_time <= datetime.now(UTC) + timedelta(seconds=1)
    finally:
        scheduler.shutdown(wait=False)
    scheduler = BackgroundScheduler(timezone=UTC)
    add_jobs(scheduler, Settings(database_url="unused", webhooks_enabled=False), engine=None, trigger="schedule")
    assert "webhooks" not in {job.id for job in scheduler.get_jobs()}


def test_plan_expiry_takes_parquet_days_past_retention_oldest_first():
    from scheduler.jobs.archive import ExpiredDay, plan_expiry

    days = [ExpiredDay(f"heartbeats_p{(TODAY - timedelta(days=n)):%Y%m%d}", TODAY - timedelta(days=n), "x")
            for n in (89, 90, 91, 120)]
    assert [d.day for d in plan_expiry(days, TODAY, 90)] == [TODAY - timedelta(days=120), TODAY - timedelta(days=91)]


def test_settings_refuse_an_unknown_archive_format_and_zero_hot_days():
    from config.settings import Settings

    with pytest.raises(ValueError, match="ARCHIVE_FORMAT"):
        Settings.from_env({"ARCHIVE_FORMAT": "csv"})
    with pytest.raises(ValueError, match="HOT_DAYS"):
        Settings.from_env({"HOT_DAYS": "0"})
    assert Settings.from_env({"ARCHIVE_FORMAT": "copy", "HOT_DAYS": "3"}).hot_days == 3
