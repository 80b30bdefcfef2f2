"""Operations (admin): run a job now under the scheduler's lock, list recent job runs."""

from __future__ import annotations

from flask import Blueprint, Response, request

from api.auth import requires_role, viewer_required
from api.errors import ApiError, error_response
from api.query_args import int_query
from api.responses import json_response
from api.schemas import JOBS_LIMIT
from api.state import current_state
from db.engine import reading
from db.job_runs import RECORDED_JOBS, list_runs
from scheduler.service import run_job

bp = Blueprint("ops", __name__)


def _run(job: str) -> Response:
    state = current_state()
    report = run_job(job, state.engine, state.settings, trigger="api", on_report=state.job_metrics.observe_report)
    body = report.to_dict()
    if report.status == "skipped":
        return error_response(409, "already_running", body)
    if report.status == "failed":
        return error_response(500, "job_failed", body)
    return json_response(body)


@bp.post("/ops/partitions")
@requires_role("operator", audit="job.partitions")
def run_partitions() -> Response:
    """Create today's and the upcoming partitions now (idempotent)."""
    return _run("partitions")


@bp.post("/ops/nightly")
@requires_role("operator", audit="job.nightly")
def run_nightly() -> Response:
    """Archive, verify and drop every partition past retention now."""
    return _run("nightly")


@bp.post("/ops/reconcile")
@requires_role("operator", audit="job.reconcile")
def run_reconcile() -> Response:
    """Heal device_last_status drift now."""
    return _run("reconcile")


@bp.post("/ops/events")
@requires_role("operator", audit="job.events")
def run_events() -> Response:
    """Derive and record device events now."""
    return _run("events")


@bp.get("/ops/jobs")
@viewer_required
def jobs() -> Response:
    """Recent job runs, newest first (?job=, ?limit= up to 500)."""
    job = request.args.get("job")
    if job is not None and job not in RECORDED_JOBS:
        raise ApiError(400, "invalid_parameter", f"job must be one of {', '.join(RECORDED_JOBS)}")
    limit = int_query(JOBS_LIMIT)
    with reading(current_state().engine) as conn:
        runs = list_runs(conn, job, limit)
    return json_response({"runs": runs})

