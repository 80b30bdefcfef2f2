"""GET /v1/fleet/summary (admin): counts for the whole fleet, served from a per-worker cache."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response

from api.auth import viewer_required
from api.concurrency import gevent_active
from api.metrics import timed_read
from api.responses import json_response, with_source
from api.state import AppState, current_state
from db.fleet import fleet_summary

bp = Blueprint("fleet", __name__)
log = logging.getLogger(__name__)


def compute_summary(state: AppState) -> dict[str, Any]:
    """Run the aggregate over the whole fleet (one statement) and stamp it with when and where."""
    result, source = state.reads.read(lambda conn: fleet_summary(
        conn,
        offline_after_s=state.settings.offline_after_seconds,
        from_heartbeats=not state.settings.read_from_last_status,
    ))
    result["as_of"] = datetime.now(UTC)
    return with_source(result, source)


def _refresh(state: AppState) -> None:
    try:
        state.summary_cache = (time.monotonic(), compute_summary(state))
    except Exception:  # the stale value keeps being served; the next request tries again
        log.warning("fleet summary refresh failed", exc_info=True)
    finally:
        state.summary_refreshing = False


@bp.get("/v1/fleet/summary")
@viewer_required
@timed_read("summary")
def summary() -> Response:
    """Total, online, offline, battery bands, app versions.

    The aggregate scans every device, so no request pays for it in steady state: each worker
    keeps the last result, and once it is older than SUMMARY_CACHE_TTL_S (2 s) the next request
    is answered from it while one background greenlet recomputes (stale-while-revalidate).
    Counts are thus at most a few seconds old; ``as_of`` says when they were taken. Only a
    worker's first request (or any request outside gevent) computes in line.
    """
    state = current_state()
    cached = state.summary_cache
    if cached is None:
        _refresh(state)
        cached = state.summary_cache
        if cached is None:  # the refresh failed: let the error surface as a 503
            return json_response(compute_summary(state))
    elif time.monotonic() - cached[0] > state.settings.summary_cache_ttl_s and not state.summary_refreshing:
        state.summary_refreshing = True
        if gevent_active():
            import gevent

            gevent.spawn(_refresh, state)
        else:
            _refresh(state)
            cached = state.summary_cache
    return json_response(cached[1])
