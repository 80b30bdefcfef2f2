"""Liveness and readiness (no auth)."""

from __future__ import annotations

from flask import Blueprint, Response

from api.responses import json_response
from api.state import current_state
from db.engine import reading

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process answers."""
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """The database answers; 503 with Retry-After when it does not."""
    state = current_state()
    try:
        with reading(state.engine) as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # any failure to reach the database means "not ready"
        detail = str(getattr(exc, "orig", exc) or exc).strip().splitlines()
        return json_response(
            {"status": "unavailable", "database": detail[0] if detail else "unreachable"},
            status=503,
            headers={"Retry-After": "2"},
        )
    return json_response({"status": "ok", "database": "ok"})
