"""POST /v1/heartbeat (device) and a device's history (admin)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from flask import Blueprint, Response, request

from api.auth import admin_required, bearer_token
from api.body import read_json_body
from api.errors import ApiError
from api.ingest import parse_heartbeat
from api.metrics import observe_heartbeat, reject_heartbeat
from api.responses import json_response
from api.state import current_state
from db.engine import reading
from db.fleet import get_device_status
from db.heartbeats import list_heartbeats

bp = Blueprint("heartbeats", __name__)

HISTORY_DEFAULT_WINDOW = timedelta(hours=24)
HISTORY_MAX_LIMIT = 10_000


@bp.post("/v1/heartbeat")
def post_heartbeat() -> Response:
    """Store one heartbeat; answered only after its transaction has committed."""
    started = time.perf_counter()
    state = current_state()
    state.writer.check_admission()  # shed before doing any work when the worker is behind
    device_id = state.tokens.authenticate(bearer_token())
    body = read_json_body(state.settings.max_body_bytes)
    row, corrected = parse_heartbeat(body, device_id, state.settings, datetime.now(UTC))
    stored = state.writer.write(row)
    observe_heartbeat(stored, time.perf_counter() - started)
    return json_response(
        {
            "status": "stored" if stored else "duplicate",
            "device_id": device_id,
            "bucket_ts": row.bucket_ts,
            "clock_skew_s": row.clock_skew_s,
            "skew_corrected": corrected,
        }
    )


@bp.after_request
def count_rejected_heartbeats(response: Response) -> Response:
    """Every error answer to POST /v1/heartbeat counts as a rejection, by its error code."""
    if response.status_code >= 400 and request.endpoint == "heartbeats.post_heartbeat":
        reject_heartbeat(getattr(response, "error_code", "") or f"http_{response.status_code}")
    return response


def _parse_time(name: str, default: datetime) -> datetime:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"{name} must be an ISO 8601 time, got {raw!r}") from None
    if value.tzinfo is None:
        raise ApiError(400, "invalid_parameter", f"{name} must carry a time zone (e.g. Z)")
    return value


def int_arg(name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within [lo, hi]; 400 otherwise."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, "invalid_parameter", f"{name} must be between {lo} and {hi}")
    return value


@bp.get("/v1/devices/<int:device_id>/heartbeats")
@admin_required
def device_history(device_id: int) -> Response:
    """Heartbeats of one device with since <= bucket < until (default: the last 24 h)."""
    state = current_state()
    now = datetime.now(UTC)
    until = _parse_time("until", now + timedelta(seconds=1))
    since = _parse_time("since", until - HISTORY_DEFAULT_WINDOW)
    if since >= until:
        raise ApiError(400, "invalid_parameter", "since must be before until")
    limit = int_arg("limit", 1000, 1, HISTORY_MAX_LIMIT)
    with reading(state.engine) as conn:
        get_device_status(conn, device_id, offline_after_s=state.settings.offline_after_seconds)
        rows = list_heartbeats(conn, device_id, since, until, limit)
    return json_response({"device_id": device_id, "since": since, "until": until, "heartbeats": rows})
