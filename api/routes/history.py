"""GET /v1/devices/<id>/heartbeats (operator plane): a device's heartbeat history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flask import Blueprint, Response, request
from sqlalchemy import Connection

from api.auth import viewer_required
from api.concurrency import run_blocking
from api.errors import ApiError
from api.query_args import int_query, time_arg
from api.responses import json_response, with_source
from api.schemas import HISTORY_LIMIT, READ_SOURCES
from api.state import current_state
from db.fleet import get_device_status
from db.history import HistoryPage, list_history

bp = Blueprint("history", __name__)

HISTORY_DEFAULT_WINDOW = timedelta(hours=24)


@bp.get("/v1/devices/<int:device_id>/heartbeats")
@viewer_required
def device_history(device_id: int) -> Response:
    """Heartbeats of one device with since <= bucket < until (default: the last 24 h), from
    PostgreSQL and the Parquet days alike; ``order`` desc (default) or asc; ``source=primary``
    reads the primary even with a fresh replica; ``next`` holds the since/until of the following
    page (null on the last). An empty window (since >= until) has none."""
    state = current_state()
    now = datetime.now(UTC)
    until = time_arg("until", now + timedelta(seconds=1))
    since = time_arg("since", until - min(HISTORY_DEFAULT_WINDOW, until - datetime.min.replace(tzinfo=UTC)))
    limit = int_query(HISTORY_LIMIT)
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "invalid_parameter", "order must be 'asc' or 'desc'")
    wanted_source = request.args.get("source", "any")
    if wanted_source not in READ_SOURCES:
        raise ApiError(400, "invalid_parameter", "source must be 'any' or 'primary'")

    def query(conn: Connection) -> HistoryPage:
        get_device_status(conn, device_id, offline_after_s=state.settings.offline_after_seconds)
        if since >= until:
            return HistoryPage([], None, None)
        return list_history(conn, state.cold, device_id, since, until, limit, newest_first=order == "desc",
                            offload=run_blocking)

    page, source = state.reads.read(query, primary_only=wanted_source == "primary")
    following = {"since": page.next_since, "until": page.next_until} if page.next_until else None
    return json_response(with_source(
        {"device_id": device_id, "since": since, "until": until, "heartbeats": page.rows, "next": following},
        source))
