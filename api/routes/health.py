"""Liveness and readiness (no auth)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response

from api.metrics import observe_database
from api.responses import json_response
from api.state import current_state
from db.engine import reading

bp = Blueprint("health", __name__)
log = logging.getLogger(__name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process answers."""
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """The database answers; 503 with Retry-After when it does not.

    No auth, so the driver's message (host, port, user, database name) goes to the log and to
    the operator-only /ops/pool_health, never into this answer."""
    state = current_state()
    try:
        with reading(state.engine) as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # any failure to reach the database means "not ready"
        observe_database(False)
        cause = exc.__cause__ or exc  # the driver's fault behind a translated DatabaseUnavailable
        detail = str(getattr(cause, "orig", cause) or cause).strip().splitlines()
        log.warning("readyz: database unavailable: %s", detail[0] if detail else type(exc).__name__)
        return json_response(
            {"status": "unavailable", "database": "unavailable"},
            status=503,
            headers={"Retry-After": "2"},
        )
    observe_database(True)
    return json_response({"status": "ok", "database": "ok"})
