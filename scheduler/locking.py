"""The advisory-lock wrapper every job runs under, and the record each run leaves in job_runs.

``run_locked`` takes a *transaction-scoped* advisory lock (``pg_try_advisory_xact_lock``) on a
connection of its own and keeps that transaction open while the job runs; the job does its
work on other connections. The lock ends with the transaction — when the run finishes, or
when the process dies and its connection closes — so it cannot outlive the run on a pooled
connection the way a session-level lock would.

A second runner (another worker, another replica, the ops endpoint) does not wait: it records
"skipped: already running" and returns. A scheduled run also skips when a run of the same job
already succeeded in the same period (``period``), so eight workers firing at 03:00 make one
nightly run, not eight. Manual runs (CLI, ops endpoint) pass no period and always run.

Every outcome becomes a ``JobReport``, handed to the caller's ``on_report`` as well (the API
passes its metrics there). The job_runs statements are in db/job_runs.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from db.errors import DatabaseUnavailable, domain_error
from db.job_runs import close_abandoned, finish_run, insert_run, succeeded_in_period

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class JobOutcome:
    """What a job body returns: rows it changed and a JSON-able account of what it did."""

    rows_affected: int = 0
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobReport:
    """One run of a job, as recorded in job_runs: succeeded, failed or skipped."""

    job: str
    status: str  # succeeded | failed | skipped
    trigger: str
    started_at: datetime
    finished_at: datetime
    duration_s: float
    rows_affected: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    run_id: int | None = None

    @property
    def skipped_reason(self) -> str | None:
        """Why a skipped run did not run ('already running' or 'already ran this period')."""
        return self.detail.get("skipped") if self.status == "skipped" else None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data."""
        return {
            "run_id": self.run_id, "job": self.job, "status": self.status, "trigger": self.trigger,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "duration_s": round(self.duration_s, 3), "rows_affected": self.rows_affected,
            "detail": self.detail, "error": self.error,
        }


JobListener = Callable[[JobReport], None]

ALREADY_RUNNING = "already running"
ALREADY_RAN = "already ran this period"


def _notify(on_report: JobListener | None, report: JobReport) -> None:
    if on_report is None:
        return
    try:
        on_report(report)
    except Exception:  # a broken listener must not turn a good run into a failed one
        log.exception("job listener %r failed", on_report)


def lock_name(lock: str) -> str:
    """The text whose hash is the advisory-lock key of a job (``nexmdm:job:<lock>``)."""
    return f"nexmdm:job:{lock}"


def run_locked(
    engine: Engine,
    job: str,
    body: Callable[[], JobOutcome],
    *,
    trigger: str = "manual",
    lock: str | None = None,
    period: str | None = None,
    on_report: JobListener | None = None,
) -> JobReport:
    """Run ``body`` under the job's advisory lock and record the run; never raises for a job
    failure (the report says ``failed``). ``period`` (scheduled runs) skips the run when one
    already succeeded in that period. ``on_report`` sees the report of every outcome, skipped
    ones included (e.g. to count metrics)."""
    lock = lock or job
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    base: dict[str, Any] = {"lock": lock}
    if period is not None:
        base["period"] = period

    def skipped(reason: str) -> JobReport:
        detail = {**base, "skipped": reason}
        with engine.begin() as conn:
            run_id = insert_run(conn, job, "skipped", trigger, detail, started_at, finished=True)
        report = JobReport(job, "skipped", trigger, started_at, datetime.now(UTC),
                           time.perf_counter() - started, None, detail, None, run_id)
        log.info("job %s (%s): skipped, %s", job, trigger, reason)
        _notify(on_report, report)
        return report

    with engine.connect() as lock_conn:
        got = lock_conn.exec_driver_sql(
            "SELECT pg_try_advisory_xact_lock(hashtext(%(key)s))", {"key": lock_name(lock)}
        ).scalar_one()
        if not got:
            lock_conn.rollback()
            return skipped(ALREADY_RUNNING)
        try:
            if period is not None:
                with engine.connect() as conn:
                    ran = succeeded_in_period(conn, job, period)
                    conn.rollback()
                if ran:
                    return skipped(ALREADY_RAN)
            with engine.begin() as conn:
                abandoned = close_abandoned(conn, lock)
                run_id = insert_run(conn, job, "running", trigger, base, started_at, finished=False)
            if abandoned:
                log.warning("job %s: closed %d abandoned run record(s)", job, abandoned)
            log.info("job %s (%s): started, run %d", job, trigger, run_id)
            try:
                outcome = body()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                extra = getattr(exc, "detail", None)
                detail = {**base, **(extra if isinstance(extra, dict) else {})}
                if isinstance(domain_error(exc), DatabaseUnavailable):
                    log.warning("job %s (%s): failed, the database is unavailable: %s", job, trigger, error)
                else:
                    log.exception("job %s (%s): failed", job, trigger)
                with engine.begin() as conn:
                    finish_run(conn, run_id, "failed", None, detail, error)
                report = JobReport(job, "failed", trigger, started_at, datetime.now(UTC),
                                   time.perf_counter() - started, None, detail, error, run_id)
            else:
                detail = {**base, **outcome.detail}
                # Recorded before the lock is released, so the next holder sees this run.
                with engine.begin() as conn:
                    finish_run(conn, run_id, "succeeded", outcome.rows_affected, detail, None)
                report = JobReport(job, "succeeded", trigger, started_at, datetime.now(UTC),
                                   time.perf_counter() - started, outcome.rows_affected, detail, None, run_id)
                log.info("job %s (%s): succeeded in %.2f s, %d rows", job, trigger,
                         report.duration_s, outcome.rows_affected)
        finally:
            lock_conn.rollback()  # ends the transaction, and with it the lock
    _notify(on_report, report)
    return report
