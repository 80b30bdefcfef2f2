"""Every job runs under a transaction-scoped advisory lock, once per period, and leaves a record."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from scheduler.locking import JobOutcome, lock_name, run_locked
from scheduler.service import run_job
from tests.support.jobdata import scalar


def runs(engine, job: str) -> list[tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT status, detail->>'skipped' FROM job_runs WHERE job = %(j)s ORDER BY id", {"j": job}).fetchall()
        conn.rollback()
    return [tuple(r) for r in rows]


def test_two_concurrent_runs_of_one_job_exactly_one_runs(engine):
    entered = threading.Event()
    release = threading.Event()
    bodies_run = []

    def slow_body() -> JobOutcome:
        bodies_run.append(1)
        entered.set()
        assert release.wait(10)
        return JobOutcome(rows_affected=7, detail={"did": "work"})

    results = {}
    first = threading.Thread(target=lambda: results.setdefault("a", run_locked(engine, "demo", slow_body)))
    first.start()
    assert entered.wait(10)
    results["b"] = run_locked(engine, "demo", slow_body, trigger="api")
    release.set()
    first.join(10)

    assert len(bodies_run) == 1
    assert results["a"].status == "succeeded" and results["a"].rows_affected == 7
    assert results["b"].status == "skipped" and results["b"].skipped_reason == "already running"
    assert sorted(runs(engine, "demo")) == [("skipped", "already running"), ("succeeded", None)]


def test_lock_does_not_outlive_the_run_on_the_pooled_connection(engine):
    run_locked(engine, "demo", lambda: JobOutcome())
    # Every pooled connection is free of advisory locks once the run is over ...
    assert scalar(engine, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    # ... and another session can take the job's lock at once.
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT pg_try_advisory_xact_lock(hashtext(%(k)s))",
                                    {"k": lock_name("demo")}).scalar_one()
        conn.rollback()


def test_once_per_period_for_scheduled_runs_but_manual_runs_always_run(engine):
    now = datetime(2026, 11, 27, 12, 5, tzinfo=UTC)
    reports = [run_job("partitions", engine, _settings(), scheduled=True, now=now, trigger="schedule")
               for _ in range(3)]
    assert [r.status for r in reports] == ["succeeded", "skipped", "skipped"]
    assert reports[1].skipped_reason == "already ran this period"
    later = run_job("partitions", engine, _settings(), scheduled=True, now=now.replace(hour=13), trigger="schedule")
    assert later.status == "succeeded"
    manual = run_job("partitions", engine, _settings(), now=now)
    assert manual.status == "succeeded"


def test_failed_run_is_recorded_with_its_error_and_reported(engine):
    seen = []

    def broken() -> JobOutcome:
        raise RuntimeError("disk on fire")

    report = run_locked(engine, "demo", broken, on_report=seen.append)
    assert report.status == "failed" and "disk on fire" in report.error
    assert seen == [report]
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT status, error, finished_at IS NOT NULL FROM job_runs").one()
    assert row[0] == "failed" and "disk on fire" in row[1] and row[2]


def test_run_abandoned_by_a_dead_runner_is_closed_by_the_next_one(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO job_runs (job, status, detail, trigger) "
                             "VALUES ('demo', 'running', '{\"lock\": \"demo\"}', 'schedule')")
    started = time.perf_counter()
    assert run_locked(engine, "demo", lambda: JobOutcome()).status == "succeeded"
    assert time.perf_counter() - started < 5
    assert sorted(runs(engine, "demo")) == [("failed", None), ("succeeded", None)]
    assert "abandoned" in scalar(engine, "SELECT error FROM job_runs WHERE status = 'failed'")


def _settings():
    from config.settings import Settings

    return Settings(database_url="unused", scheduler_enabled=False)


def test_a_scheduled_run_during_an_outage_is_one_warning_line_not_a_traceback(caplog, tmp_path) -> None:
    """The database down (a restart, a failover) when a scheduled job fires: the run is not
    made, and the log says so in one line; a traceback would read as a bug (and the fault drills
    forbid them in the server's log)."""
    import logging

    from config.settings import Settings
    from db.engine import make_engine
    from scheduler.service import scheduled_run
    from tests.support.live import free_port

    url = f"postgresql://nexmdm:x@127.0.0.1:{free_port()}/nexmdm"
    settings = Settings(database_url=url, archive_dir=tmp_path)
    engine = make_engine(settings, url)
    try:
        with caplog.at_level(logging.INFO):
            scheduled_run("reconcile", engine, settings)
    finally:
        engine.dispose()
    said = [r for r in caplog.records if "reconcile" in r.getMessage()]
    assert said and all(r.levelno == logging.WARNING and r.exc_info is None for r in said), \
        [(r.levelname, r.getMessage(), r.exc_info is not None) for r in said]
    assert "the database is unavailable" in said[0].getMessage()
