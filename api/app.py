"""create_app(settings): the table of contents of the API, one configure_* step per concern."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import Engine

from api.auth import TokenCache
from api.clients import parse_networks
from api.errors import configure_errors
from api.metrics import ReplicaGauges, metered_pool
from api.planes import configure_plane
from api.state import AppState
from api.throttle import DeviceRateLimit, FailureThrottle
from config.logs import configure_logging as configure_logging_as
from config.settings import Settings
from db.cold import ColdReader
from db.engine import make_engine
from db.reads import ReadRouter, make_read_router


def create_app(settings: Settings, *, engine: Engine | None = None, admin_key: str | None = None) -> Flask:
    """Build the Flask app of ``settings.plane``. ``settings.database_url`` must be resolved (see db.engine).

    Nothing here talks to the database: the app starts while the database is down, and answers
    503 until it is back."""
    app = Flask("nexmdm")
    app.config["MAX_CONTENT_LENGTH"] = None  # limits are per route (api/body.py)
    key = admin_key or settings.admin_key
    if not key:
        raise ValueError("create_app needs an admin key (ADMIN_KEY, or config.admin_key.ensure_admin_key)")
    # The plane is the label of this app's pool gauges (and of its worker: configure_metrics).
    engine = engine or make_engine(settings, pool_class=metered_pool(settings.plane))
    replica_gauges = ReplicaGauges()
    reads = (make_read_router(settings, engine, replica_gauges.observe) if settings.plane != "device"
             else ReadRouter(engine))
    app.extensions["nexmdm"] = AppState(
        settings=settings, engine=engine, admin_key=key,
        tokens=TokenCache(engine, settings.token_cache_ttl_s, settings.token_sync_interval_s),
        reads=reads,
        trusted_proxies=parse_networks(settings.trusted_proxies),
        auth_failures=FailureThrottle(settings.auth_failure_limit, settings.auth_failure_window_s),
        device_limit=DeviceRateLimit(settings.device_max_per_minute),
        cold=ColdReader(settings.archive_dir),
        replica_gauges=replica_gauges,
    )
    configure_lag_guard(reads, settings)
    configure_logging(settings)
    configure_errors(app)
    configure_input_checks(app)
    configure_plane(app, settings.plane)
    configure_metrics(app, settings.plane)
    configure_heartbeat_path(app)
    return app


def configure_lag_guard(reads: ReadRouter, settings: Settings) -> None:
    """Measure the replica's lag every READ_LAG_CHECK_INTERVAL_S in the background (a greenlet
    in a gevent worker, else a daemon thread); nothing without a replica."""
    if not reads.enabled:
        return
    from api.concurrency import gevent_active

    interval_s = settings.read_lag_check_interval_s
    if gevent_active():
        import gevent

        gevent.spawn(reads.run_guard, gevent.sleep, interval_s)
    else:
        import threading
        import time

        threading.Thread(target=reads.run_guard, args=(time.sleep, interval_s), daemon=True,
                         name="replica-lag-guard").start()


def configure_logging(settings: Settings) -> None:
    configure_logging_as(settings)


def configure_heartbeat_path(app: Flask) -> None:
    """POST /v1/heartbeat by the lean WSGI path in front of Flask (HEARTBEAT_LEAN_PATH), on the
    planes that serve heartbeats."""
    state: AppState = app.extensions["nexmdm"]
    if state.settings.heartbeat_lean_path and state.settings.plane in ("device", "all"):
        from api.heartbeat_wsgi import install

        install(app, state)


def configure_input_checks(app: Flask) -> None:
    """Checks every request gets before its route (a route validates its own body and fields)."""
    from api.body import reject_nul_in_query

    app.before_request(reject_nul_in_query)


def configure_metrics(app: Flask, plane: str) -> None:
    """Prometheus: per-endpoint request metrics and the job series (see api/metrics.py)."""
    from api.routes.observability import configure_metrics as configure

    configure(app, plane)
