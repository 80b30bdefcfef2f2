"""create_app(settings): the table of contents of the API, one configure_* step per concern."""

from __future__ import annotations

import logging

from flask import Flask
from sqlalchemy import Engine

from api.auth import TokenCache
from api.errors import configure_errors
from api.metrics import MeteredQueuePool
from api.planes import configure_plane
from api.state import AppState
from config.settings import Settings
from db.engine import make_engine


def create_app(settings: Settings, *, engine: Engine | None = None, admin_key: str | None = None) -> Flask:
    """Build the Flask app of ``settings.plane``. ``settings.database_url`` must be resolved (see db.engine)."""
    app = Flask("nexmdm")
    app.config["MAX_CONTENT_LENGTH"] = None  # limits are per route (api/body.py)
    key = admin_key or settings.admin_key
    if not key:
        raise ValueError("create_app needs an admin key (ADMIN_KEY, or config.admin_key.ensure_admin_key)")
    app.config["NEXMDM_ADMIN_KEY"] = key
    engine = engine or make_engine(settings, pool_class=MeteredQueuePool)
    app.extensions["nexmdm"] = AppState(
        settings=settings, engine=engine, admin_key=key,
        tokens=TokenCache(engine, settings.token_cache_ttl_s, settings.token_sync_interval_s),
    )
    configure_logging(settings)
    configure_errors(app)
    configure_plane(app, settings.plane)
    configure_metrics(app, settings.plane)
    return app


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_metrics(app: Flask, plane: str) -> None:
    """Prometheus: per-endpoint request metrics and the job series (see api/metrics.py)."""
    from api.routes.observability import configure_metrics as configure

    configure(app, plane)
