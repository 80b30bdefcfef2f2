"""The event log (operator): GET /v1/events and one device's events, keyset-paginated."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request
from sqlalchemy import Connection

from api.auth import viewer_required
from api.errors import ApiError
from api.responses import json_response, with_source
from api.routes.heartbeats import int_arg
from api.routes.history import time_arg
from api.state import current_state
from db.events import EVENT_TYPES, EventFilter, list_events
from db.fleet import get_device_status

bp = Blueprint("events", __name__)

MAX_LIMIT = 1000
MAX_ID = 2**63 - 1


def _types() -> tuple[str, ...]:
    raw = request.args.get("type") or ""
    types = tuple(t for t in (part.strip() for part in raw.split(",")) if t)
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown:
        raise ApiError(400, "invalid_parameter", f"unknown event type {unknown[0]!r}; one of {', '.join(EVENT_TYPES)}")
    return types


def _page(device_id: int | None) -> Response:
    flt = EventFilter(types=_types(), device_id=device_id, since=time_arg("since", None), until=time_arg("until", None))
    if flt.since is not None and flt.until is not None and flt.since >= flt.until:
        raise ApiError(400, "invalid_parameter", "since must be before until")
    if request.args.get("after") and request.args.get("before"):
        raise ApiError(400, "invalid_parameter", "pass after (oldest first) or before (newest first), not both")
    order = request.args.get("order") or None
    if order not in (None, "asc", "desc"):
        raise ApiError(400, "invalid_parameter", "order must be 'asc' or 'desc'")
    after = int_arg("after", 0, 0, MAX_ID)
    newest_first = order == "desc" or bool(request.args.get("before"))
    before = int_arg("before", MAX_ID, 0, MAX_ID) if newest_first else None
    limit = int_arg("limit", 100, 1, MAX_LIMIT)
    state = current_state()

    def fetch(conn: Connection) -> tuple[list[dict[str, Any]], int | None]:
        if device_id is not None:
            get_device_status(conn, device_id, offline_after_s=state.settings.offline_after_seconds)
        return list_events(conn, flt, after=after, before=before, limit=limit)

    # From the replica while it is fresh enough (an event log a second behind is still the log).
    (rows, cursor), source = state.reads.read(fetch)
    return json_response(with_source({"events": rows, "next_after": cursor if before is None else None,
                                      "next_before": cursor if before is not None else None}, source))


@bp.get("/v1/events")
@viewer_required
def events() -> Response:
    """Fleet events (?type=a,b &device_id= &since= &until=), oldest first after ?after=, or
    newest first (?order=desc, then ?before=)."""
    device_id = int_arg("device_id", 0, 1, MAX_ID) if request.args.get("device_id") else None
    return _page(device_id)


@bp.get("/v1/devices/<int:device_id>/events")
@viewer_required
def device_events(device_id: int) -> Response:
    """One device's events (404 for an unknown device); the same parameters as /v1/events."""
    return _page(device_id)
