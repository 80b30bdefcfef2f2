"""The job_runs table: one record per run (or skipped run) of a job, and every statement on it.

Query functions take the connection first and never commit: the caller owns the transaction.
The run-time checks (``succeeded_in_period``, ``close_abandoned``) run on every firing of every
job - every 30 s for the events job - so each is served by a partial index of its own
(migration 0006_job_runs_run_indexes) and reads the few rows it needs, not the table.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import Connection

# The scheduled jobs (scheduler.service runs them), and every job name job_runs records: those
# and the restore command. Here, so that the API and the metrics name them without the scheduler.
SCHEDULED_JOBS = ("partitions", "nightly", "reconcile", "events")
RECORDED_JOBS = (*SCHEDULED_JOBS, "restore")
ABANDONED_ERROR = "abandoned: the runner stopped before finishing (process killed or restarted)"

# Served by ix_job_runs_succeeded_period (job, detail->>'period') WHERE status = 'succeeded'.
SUCCEEDED_IN_PERIOD_SQL = (
    "SELECT 1 FROM job_runs WHERE job = %(job)s AND status = 'succeeded' "
    "AND detail->>'period' = %(period)s LIMIT 1"
)
# Served by ix_job_runs_running (COALESCE(detail->>'lock', job)) WHERE status = 'running'.
CLOSE_ABANDONED_SQL = (
    "UPDATE job_runs SET status = 'failed', finished_at = now(), error = %(error)s "
    "WHERE status = 'running' AND COALESCE(detail->>'lock', job) = %(lock)s"
)


def _encode(detail: dict[str, Any]) -> str:
    return msgspec.json.encode(detail).decode()


def insert_run(
    conn: Connection, job: str, status: str, trigger: str, detail: dict[str, Any], started_at: datetime,
    *, finished: bool,
) -> int:
    """Record a run in ``status`` (``finished``: stamped finished now, as a skipped run is); returns its id."""
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


def finish_run(
    conn: Connection, run_id: int, status: str, rows: int | None, detail: dict[str, Any], error: str | None
) -> None:
    """Stamp a run finished now with its outcome."""
    conn.exec_driver_sql(
        """
        UPDATE job_runs SET finished_at = now(), status = %(status)s, rows_affected = %(rows)s,
               detail = %(detail)s::jsonb, error = %(error)s
        WHERE id = %(id)s
        """,
        {"id": run_id, "status": status, "rows": rows, "detail": _encode(detail), "error": error},
    )


def succeeded_in_period(conn: Connection, job: str, period: str) -> bool:
    """Whether a run of ``job`` already succeeded in ``period`` (its detail's ``period``)."""
    return conn.exec_driver_sql(SUCCEEDED_IN_PERIOD_SQL, {"job": job, "period": period}).first() is not None


def close_abandoned(conn: Connection, lock: str) -> int:
    """Mark failed every 'running' record of ``lock``'s jobs; returns how many.

    Call only while holding the lock: its holder is the only possible runner, so any such
    record belongs to a runner that died (its connection closed and freed the lock)."""
    return conn.exec_driver_sql(CLOSE_ABANDONED_SQL, {"lock": lock, "error": ABANDONED_ERROR}).rowcount


def list_runs(conn: Connection, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Recent runs, newest first (optionally of one job)."""
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
    return [dict(r._mapping) for r in rows]


def last_successes(conn: Connection) -> dict[str, float]:
    """Each job's last successful finish, in Unix seconds."""
    rows = conn.exec_driver_sql(
        "SELECT job, extract(epoch FROM max(finished_at))::float8 FROM job_runs "
        "WHERE status = 'succeeded' AND finished_at IS NOT NULL GROUP BY job"
    ).all()
    return {job: float(finished_at_s) for job, finished_at_s in rows}


def runs_per_period(conn: Connection, job: str, trigger: str) -> list[tuple[str | None, int, int, int]]:
    """For each period of ``job``'s runs by ``trigger``: (period, succeeded, skipped, distinct
    minutes in which runs started), oldest period first (the cluster drill's once-per-period check)."""
    rows = conn.exec_driver_sql(
        """
        SELECT detail->>'period', count(*) FILTER (WHERE status = 'succeeded'),
               count(*) FILTER (WHERE status = 'skipped'), count(DISTINCT date_trunc('minute', started_at))
        FROM job_runs WHERE job = %(job)s AND trigger = %(trigger)s GROUP BY 1 ORDER BY 1
        """,
        {"job": job, "trigger": trigger},
    ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def prune_runs(conn: Connection, before: datetime) -> int:
    """Delete finished records that started before ``before``; returns how many."""
    return conn.exec_driver_sql(
        "DELETE FROM job_runs WHERE started_at < %(cutoff)s AND status <> 'running'", {"cutoff": before}
    ).rowcount
