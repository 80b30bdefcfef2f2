"""The event log (operator): GET /v1/events and one device's events, keyset-paginated."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request
from sqlalchemy import Connection

from api.auth import viewer_required
from api.errors import ApiError
from api.query_args import int_query, text_query, time_arg
from api.responses import json_response, with_source
from api.schemas import EVENTS_AFTER, EVENTS_BEFORE, EVENTS_DEVICE_ID, EVENTS_LIMIT, EVENTS_TYPES
from api.state import current_state
from db.events import EventFilter, list_events
from db.fleet import get_device_status

bp = Blueprint("events", __name__)



def _types() -> tuple[str, ...]:
    raw = text_query(EVENTS_TYPES)
    return tuple(raw.split(",")) if raw else ()


def _page(device_id: int | None) -> Response:
    # since >= until is an empty window and after with before a range of ids: answers, not errors.
    flt = EventFilter(types=_types(), device_id=device_id, since=time_arg("since", None), until=time_arg("until", None))
    order = request.args.get("order")
    if order not in (None, "asc", "desc"):
        raise ApiError(400, "invalid_parameter", "order must be 'asc' or 'desc'")
    after = int_query(EVENTS_AFTER)
    newest_first = order == "desc" or EVENTS_BEFORE.name in request.args
    before = int_query(EVENTS_BEFORE) if newest_first else None
    limit = int_query(EVENTS_LIMIT)
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
    device_id = int_query(EVENTS_DEVICE_ID) if EVENTS_DEVICE_ID.name in request.args else None
    return _page(device_id)


@bp.get("/v1/devices/<int:device_id>/events")
@viewer_required
def device_events(device_id: int) -> Response:
    """One device's events (404 for an unknown device); the same parameters as /v1/events."""
    return _page(device_id)
