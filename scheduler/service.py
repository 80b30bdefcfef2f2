"""The job table, ``run_job`` (one run now, under the job's lock) and ``start_scheduler``.

In production each gunicorn worker starts a GeventScheduler from wsgi.py; ``python -m
scheduler`` runs the same schedule in a process of its own. Any number of them may run at once:
each run takes the job's advisory lock and scheduled runs are once per period (see
scheduler/locking.py), so a schedule firing in eight workers makes one run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from config.settings import Settings
from db.errors import DatabaseUnavailable, domain_error, fault_summary
from db.job_runs import SCHEDULED_JOBS
from scheduler.locking import JobListener, JobOutcome, JobReport, Progress, run_locked

log = logging.getLogger(__name__)

JOBS = SCHEDULED_JOBS
JOB_FUNC = "scheduler.service:scheduled_run"  # registered by dotted path


def period_of(job: str, now: datetime, every_s: int = 30) -> str:
    """The period a scheduled run belongs to: the UTC day for nightly, ``every_s`` seconds for
    events, the UTC hour otherwise."""
    now = now.astimezone(UTC)
    if job == "events":
        start = int(now.timestamp()) // every_s * every_s
        return datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return now.date().isoformat() if job == "nightly" else now.strftime("%Y-%m-%dT%H")


def job_body(
    job: str, engine: Engine, settings: Settings, now: datetime, progress: Progress
) -> Callable[[], JobOutcome]:
    """The body of one job, bound to its inputs (the clock among them, for tests)."""
    from scheduler.jobs.archive import run_nightly
    from scheduler.jobs.events import run_events
    from scheduler.jobs.partitions import run_partitions
    from scheduler.jobs.reconcile import run_reconcile

    if job == "partitions":
        return lambda: run_partitions(engine, today=now.astimezone(UTC).date(),
                                      premake_days=settings.partition_premake_days, progress=progress,
                                      events_retention_days=settings.events_retention_days,
                                      deliveries_keep_days=settings.webhook_deliveries_keep_days)
    if job == "nightly":
        return lambda: run_nightly(engine, settings, now=now, progress=progress)
    if job == "reconcile":
        return lambda: run_reconcile(engine, statement_timeout_ms=settings.job_statement_timeout_ms,
                                     progress=progress)
    if job == "events":
        return lambda: run_events(engine, settings, now=now, progress=progress)
    raise ValueError(f"unknown job {job!r}; one of {', '.join(JOBS)}")


def run_job(
    job: str,
    engine: Engine,
    settings: Settings,
    *,
    trigger: str = "manual",
    scheduled: bool = False,
    now: datetime | None = None,
    progress: Progress | None = None,
    on_report: JobListener | None = None,
) -> JobReport:
    """Run one job now under its advisory lock and return its report. Scheduled runs are
    skipped when the job already succeeded this period; manual ones always run.
    ``on_report`` sees the report (see scheduler.locking.run_locked)."""
    now = now or datetime.now(UTC)
    job_log = logging.getLogger(f"scheduler.jobs.{job}")
    body = job_body(job, engine, settings, now, progress or job_log.info)
    period = period_of(job, now, settings.events_interval_s) if scheduled else None
    return run_locked(engine, job, body, trigger=trigger, period=period, on_report=on_report)


def scheduled_run(
    job: str, engine: Engine, settings: Settings, trigger: str = "schedule", on_report: JobListener | None = None
) -> None:
    """What the scheduler calls (by dotted path)."""
    try:
        run_job(job, engine, settings, trigger=trigger, scheduled=True, on_report=on_report)
    except Exception as exc:  # the next period tries again
        if isinstance(domain_error(exc), DatabaseUnavailable):
            # An outage (a restart, a failover) is expected and said in one line; the service
            # recovers by itself, so no traceback for an operator to chase.
            log.warning("scheduled run of %s not made, the database is unavailable: %s", job, fault_summary(exc))
        else:
            log.exception("scheduled run of %s could not be recorded", job)


def add_jobs(
    scheduler: Any, settings: Settings, engine: Engine, trigger: str, on_report: JobListener | None = None
) -> None:
    """Register the jobs (max_instances=1, coalesce) on an APScheduler scheduler, and the
    webhook dispatcher pass (no job record: it runs every second and leases its webhooks)."""
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    crons = {"partitions": settings.partitions_cron, "nightly": settings.nightly_cron,
             "reconcile": settings.reconcile_cron}
    for job in JOBS:
        extra: dict[str, Any] = {}
        if job == "partitions":
            extra["next_run_time"] = datetime.now(UTC)  # at start-up too
        when = (IntervalTrigger(seconds=settings.events_interval_s, timezone=UTC) if job == "events"
                else CronTrigger.from_crontab(crons[job], timezone=UTC))
        scheduler.add_job(
            JOB_FUNC, when, id=job, name=job,
            kwargs={"job": job, "engine": engine, "settings": settings, "trigger": trigger,
                    "on_report": on_report},
            max_instances=1, coalesce=True, misfire_grace_time=3600, replace_existing=True, **extra,
        )
    if not settings.webhooks_enabled:
        return
    scheduler.add_job(
        "scheduler.jobs.webhooks:dispatch_webhooks",
        IntervalTrigger(seconds=settings.webhook_poll_interval_s, timezone=UTC), id="webhooks", name="webhooks",
        kwargs={"engine": engine, "settings": settings}, max_instances=1, coalesce=True,
        misfire_grace_time=60, replace_existing=True,
    )


def start_scheduler(settings: Settings, engine: Engine, on_report: JobListener | None = None) -> Any:
    """Start the jobs in this gevent worker (a GeventScheduler); returns the scheduler.
    ``on_report`` sees every run's report (the API counts them in its metrics)."""
    from apscheduler.schedulers.gevent import GeventScheduler

    scheduler = GeventScheduler(timezone=UTC)
    add_jobs(scheduler, settings, engine, trigger="schedule", on_report=on_report)
    scheduler.start()
    log.info("scheduler started: %s", ", ".join(f"{j.id} next {j.next_run_time:%Y-%m-%d %H:%M}Z"
                                                 for j in scheduler.get_jobs()))
    return scheduler
