"""GET /v1/fleet/summary (admin): counts for the whole fleet, cached for a moment."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from flask import Blueprint, Response

from api.auth import admin_required
from api.metrics import timed_read
from api.responses import json_response
from api.state import current_state
from db.fleet import fleet_summary

bp = Blueprint("fleet", __name__)


@bp.get("/v1/fleet/summary")
@admin_required
@timed_read("summary")
def summary() -> Response:
    """Total, online, offline, battery bands, app versions. Computed at most once per
    SUMMARY_CACHE_TTL_S per worker: counts over the whole fleet are a moment old at most
    (``as_of`` says when), and a dashboard polling it costs one aggregate per interval."""
    state = current_state()
    now = time.monotonic()
    cached = state.summary_cache
    if cached is None or now - cached[0] > state.settings.summary_cache_ttl_s:
        with state.engine.connect() as conn:
            result = fleet_summary(
                conn,
                offline_after_s=state.settings.offline_after_seconds,
                from_heartbeats=not state.settings.read_from_last_status,
            )
            conn.rollback()
        result["as_of"] = datetime.now(UTC)
        state.summary_cache = cached = (now, result)
    return json_response(cached[1])
