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

Every outcome becomes a ``JobReport``; listeners registered with ``add_job_listener`` see each
one (metrics attach there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import Engine

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
_listeners: list[JobListener] = []

ALREADY_RUNNING = "already running"
ALREADY_RAN = "already ran this period"


def add_job_listener(listener: JobListener) -> None:
    """Call ``listener(report)`` after every run, skipped ones included (e.g. to count metrics)."""
    if listener not in _listeners:
        _listeners.append(listener)


def remove_job_listener(listener: JobListener) -> None:
    """Stop calling a listener added with ``add_job_listener``."""
    if listener in _listeners:
        _listeners.remove(listener)


def _notify(report: JobReport) -> None:
    for listener in list(_listeners):
        try:
            listener(report)
        except Exception:  # a broken listener must not turn a good run into a failed one
            log.exception("job listener %r failed", listener)


def lock_name(lock: str) -> str:
    """The text whose hash is the advisory-lock key of a job (``nexmdm:job:<lock>``)."""
    return f"nexmdm:job:{lock}"


def _encode(detail: dict[str, Any]) -> str:
    return msgspec.json.encode(detail).decode()


def _insert_run(engine: Engine, job: str, status: str, trigger: str, detail: dict[str, Any],
                started_at: datetime, finished: bool) -> int:
    with engine.begin() as conn:
        return conn.exec_driver_sql(
            """
            INSERT INTO job_runs (job, started_at, finished_at, status, detail, trigger)
            VALUES (%(job)s, %(started)s, CASE WHEN %(finished)s THEN now() END, %(status)s,
                    %(detail)s::jsonb, %(trigger)s)
            RETURNING id
            """,
            {"job": job, "started": started_at, "finished": finished, "status": status,
             "detail": _encode(detail), "trigger": trigger},
        ).scalar_one()


def _finish_run(engine: Engine, run_id: int, status: str, rows: int | None, detail: dict[str, Any],
                error: str | None) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            """
            UPDATE job_runs SET finished_at = now(), status = %(status)s, rows_affected = %(rows)s,
                   detail = %(detail)s::jsonb, error = %(error)s
            WHERE id = %(id)s
            """,
            {"id": run_id, "status": status, "rows": rows, "detail": _encode(detail), "error": error},
        )


def _ran_in_period(engine: Engine, job: str, period: str) -> bool:
    with engine.connect() as conn:
        found = conn.exec_driver_sql(
            "SELECT 1 FROM job_runs WHERE job = %(job)s AND status = 'succeeded' "
            "AND detail->>'period' = %(period)s LIMIT 1",
            {"job": job, "period": period},
        ).first()
        conn.rollback()
    return found is not None


def _close_abandoned(engine: Engine, lock: str) -> int:
    # Whoever holds the lock is the only possible runner, so any 'running' record of this
    # lock's jobs belongs to a runner that died (its connection closed and freed the lock).
    with engine.begin() as conn:
        return conn.exec_driver_sql(
            """
            UPDATE job_runs SET status = 'failed', finished_at = now(),
                   error = 'abandoned: the runner stopped before finishing (process killed or restarted)'
            WHERE status = 'running' AND COALESCE(detail->>'lock', job) = %(lock)s
            """,
            {"lock": lock},
        ).rowcount


def run_locked(
    engine: Engine,
    job: str,
    body: Callable[[], JobOutcome],
    *,
    trigger: str = "manual",
    lock: str | None = None,
    period: str | None = None,
) -> JobReport:
    """Run ``body`` under the job's advisory lock and record the run; never raises for a job
    failure (the report says ``failed``). ``period`` (scheduled runs) skips the run when one
    already succeeded in that period."""
    lock = lock or job
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    base: dict[str, Any] = {"lock": lock}
    if period is not None:
        base["period"] = period

    def skipped(reason: str) -> JobReport:
        detail = {**base, "skipped": reason}
        run_id = _insert_run(engine, job, "skipped", trigger, detail, started_at, finished=True)
        report = JobReport(job, "skipped", trigger, started_at, datetime.now(UTC),
                           time.perf_counter() - started, None, detail, None, run_id)
        log.info("job %s (%s): skipped, %s", job, trigger, reason)
        _notify(report)
        return report

    with engine.connect() as lock_conn:
        got = lock_conn.exec_driver_sql(
            "SELECT pg_try_advisory_xact_lock(hashtext(%(key)s))", {"key": lock_name(lock)}
        ).scalar_one()
        if not got:
            lock_conn.rollback()
            return skipped(ALREADY_RUNNING)
        try:
            if period is not None and _ran_in_period(engine, job, period):
                return skipped(ALREADY_RAN)
            abandoned = _close_abandoned(engine, lock)
            if abandoned:
                log.warning("job %s: closed %d abandoned run record(s)", job, abandoned)
            run_id = _insert_run(engine, job, "running", trigger, base, started_at, finished=False)
            log.info("job %s (%s): started, run %d", job, trigger, run_id)
            try:
                outcome = body()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                extra = getattr(exc, "detail", None)
                detail = {**base, **(extra if isinstance(extra, dict) else {})}
                log.exception("job %s (%s): failed", job, trigger)
                _finish_run(engine, run_id, "failed", None, detail, error)
                report = JobReport(job, "failed", trigger, started_at, datetime.now(UTC),
                                   time.perf_counter() - started, None, detail, error, run_id)
            else:
                detail = {**base, **outcome.detail}
                # Recorded before the lock is released, so the next holder sees this run.
                _finish_run(engine, run_id, "succeeded", outcome.rows_affected, detail, None)
                report = JobReport(job, "succeeded", trigger, started_at, datetime.now(UTC),
                                   time.perf_counter() - started, outcome.rows_affected, detail, None, run_id)
                log.info("job %s (%s): succeeded in %.2f s, %d rows", job, trigger,
                         report.duration_s, outcome.rows_affected)
        finally:
            lock_conn.rollback()  # ends the transaction, and with it the lock
    _notify(report)
    return report


def list_job_runs(engine: Engine, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Recent runs, newest first (optionally of one job)."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            """
            SELECT id AS run_id, job, status, trigger, started_at, finished_at,
                   EXTRACT(EPOCH FROM finished_at - started_at)::float8 AS duration_s,
                   rows_affected, detail, error
            FROM job_runs
            WHERE %(job)s::text IS NULL OR job = %(job)s
            ORDER BY started_at DESC, id DESC
            LIMIT %(limit)s
            """,
            {"job": job, "limit": limit},
        ).fetchall()
        conn.rollback()
    return [dict(r._mapping) for r in rows]
