"""GET /metrics (Prometheus text, whole server) and GET /ops/pool_health (admin).

Also ``configure_metrics``: per-endpoint request metrics (api.metrics.observe_request), by
endpoint (never by path, which would put device ids in labels) and by a method from a closed set
(prometheus-flask-exporter, used before, labelled by whatever method a client sent: 3,000
requests with made-up methods grew /metrics from 169 KB to 8.75 MB). POST /v1/heartbeat is left
out of them: the nexmdm_heartbeat* metrics already count every heartbeat by outcome and time it.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from flask import Blueprint, Flask, Response, current_app, request
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from api.auth import requires_role, viewer_required
from api.concurrency import gevent_active
from api.metrics import (
    JobMetrics,
    initialize_series,
    mark_worker_ready,
    observe_database,
    observe_request,
    render_metrics,
    sample_worker,
    start_worker_sampler,
)
from api.openapi import Operation
from api.pool_health import (
    assess,
    local_postgres_cpu,
    plane_pool_figures,
    postgres_figures,
    server_pool_figures,
)
from api.responses import json_response
from api.schemas import PoolHealth, PostgresCpu
from api.state import current_state
from db.connections import backend_pid, connection_use
from db.engine import reading
from db.errors import DatabaseUnavailable
from db.job_runs import last_successes

log = logging.getLogger(__name__)

bp = Blueprint("observability", __name__)

HEARTBEAT_ENDPOINT = "heartbeats.post_heartbeat"
_STARTED = "nexmdm.started"
_OPS_ENGINE = "nexmdm_ops_engine"


def configure_metrics(app: Flask, plane: str = "all") -> None:
    """Request metrics (every endpoint but the heartbeat), zero-valued series, this worker's
    sampler. No database I/O: the job series come from the runs this app reports
    (AppState.job_metrics) and from job_runs, read when /metrics is scraped."""

    @app.before_request
    def _start_timer() -> None:
        request.environ[_STARTED] = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        started = request.environ.get(_STARTED)
        if started is not None and request.endpoint != HEARTBEAT_ENDPOINT:
            observe_request(request.method, request.endpoint, response.status_code, time.perf_counter() - started)
        return response

    initialize_series()
    mark_worker_ready(plane)
    state = app.extensions["nexmdm"]
    if gevent_active():  # a gunicorn worker: its queue, loop lag and process figures, all along
        start_worker_sampler(lambda: state.started_writer, state.settings.ingest_queue_max, plane)


def seed_job_last_success(engine: Engine, job_metrics: JobMetrics) -> None:
    """Each job's last success from job_runs: after a restart, and for runs made elsewhere."""
    try:
        with reading(engine) as conn:
            finished = last_successes(conn)
    except (SQLAlchemyError, DatabaseUnavailable) as exc:  # reading() translates driver faults
        log.warning("job last-success times not read from job_runs: %s", str(exc).splitlines()[0])
        return
    for job, finished_at_s in finished.items():
        job_metrics.set_last_success(job, finished_at_s)


def _metrics_key() -> str | None:
    # Prometheus 2.x cannot send custom headers but can send a bearer token, so an operator
    # key is also accepted as "Authorization: Bearer <key>" on this one endpoint.
    key = request.headers.get("x-admin")
    if not key:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
    return key or None


@bp.get("/metrics")
@requires_role("viewer", key=_metrics_key)
def metrics() -> Response:
    """Prometheus text exposition of every worker (viewer: x-admin, or the key as a bearer token).

    Each job's last success is read from job_runs at the first scrape and every JobMetrics.reread_s
    after (runs made by another process - python -m scheduler, another node - are seen that way)."""
    state = current_state()
    if state.job_metrics.reread_due(time.monotonic()):
        seed_job_last_success(_ops_engine(current_app, state.engine), state.job_metrics)
    if not gevent_active():  # no sampler runs (Flask's test client): this process, now
        sample_worker(state.started_writer, state.settings.ingest_queue_max)
    check_database(_ops_engine(current_app, state.engine))
    body, content_type = render_metrics(state.settings.prometheus_multiproc_dir, [state.replica_gauges.registry])
    return Response(body, status=200, headers={"Content-Type": content_type})


def check_database(ops_engine: Engine) -> None:
    """At each scrape: whether the database answers, and its connections against the limit."""
    try:
        with ops_engine.connect() as conn:
            use = connection_use(conn)
    except (SQLAlchemyError, DatabaseUnavailable):
        observe_database(False)
        return
    observe_database(True, use.in_use, use.max_connections - use.reserved_connections)


def _ops_engine(app: Flask, engine: Engine) -> Engine:
    # Unpooled and separate from the app's pool: pool health must answer when the pool is
    # exhausted, and must not change the figures it reports.
    ops = app.extensions.get(_OPS_ENGINE)
    if ops is None:
        ops = create_engine(
            engine.url, poolclass=NullPool,
            connect_args={"application_name": "nexmdm-ops", "connect_timeout": 3,
                          "options": "-c statement_timeout=3000"},
        )
        app.extensions[_OPS_ENGINE] = ops
    return ops


@bp.get("/ops/pool_health")
@viewer_required
def pool_health() -> Response:
    """Pool figures of every live worker (and of each plane), PostgreSQL's connection use, OK/WARN/CRITICAL."""
    state = current_state()
    pool = server_pool_figures(state.settings.prometheus_multiproc_dir, state.engine.pool)
    planes = plane_pool_figures(state.settings.prometheus_multiproc_dir, state.engine.pool, state.settings.plane)
    postgres, error = None, None
    cpu: tuple[PostgresCpu | None, str | None] = (None, "the database cannot be reached")
    try:
        with _ops_engine(current_app, state.engine).connect() as conn:
            postgres = postgres_figures(connection_use(conn))
            # While this connection's backend lives: its parent is the postmaster.
            cpu = local_postgres_cpu(state.engine.url.host, backend_pid(conn))
    except SQLAlchemyError as exc:
        lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        error = lines[0] if lines else type(exc).__name__
    return json_response(assess(pool, postgres, error, datetime.now(UTC), planes, cpu))


# This module's operations in /openapi.json (api.openapi.operations() gathers them).
OPERATIONS = (
    Operation("get", "/metrics", "Prometheus metrics of every worker (text format)", "admin", errors=(401, 403)),
    Operation("get", "/ops/pool_health", "Pool and PostgreSQL connection health, OK/WARN/CRITICAL", "admin",
              response=PoolHealth, errors=(401, 403)),
)
