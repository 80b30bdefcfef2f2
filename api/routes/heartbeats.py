"""POST /v1/heartbeat (device plane)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, request

from api.auth import bearer_token_from
from api.body import read_json_body_from
from api.clients import client_address, request_arrival
from api.errors import ApiError
from api.heartbeat_parsing import parse_heartbeat
from api.metrics import observe_heartbeat, reject_heartbeat
from api.responses import json_response
from api.state import AppState, current_state
from api.throttle import hold_refusal

bp = Blueprint("heartbeats", __name__)


@bp.post("/v1/heartbeat")
def post_heartbeat() -> Response:
    """Store one heartbeat; answered only after its transaction has committed."""
    return json_response(accept_heartbeat(current_state(), request.environ))


def accept_heartbeat(state: AppState, environ: dict[str, Any]) -> dict[str, Any]:
    """The whole of ``POST /v1/heartbeat`` but the HTTP answer, without Flask: admission,
    authentication, body, validation, the group-commit write and its metrics. Returns the
    acknowledgement (after COMMIT); raises ApiError or a domain error otherwise. Both the
    Flask route and the lean WSGI path (api/heartbeat_wsgi.py) run it."""
    arrived = request_arrival(environ)
    writer = state.writer
    writer.check_admission()  # shed before doing any work when the worker is behind
    try:
        device_id = _authenticated(state, environ)
    except BaseException as exc:
        writer.release()  # (a 429 is held outside the in-flight count)
        if isinstance(exc, ApiError) and exc.status == 429:
            hold_refusal(state.settings.limit_refusal_delay_s)
        raise
    try:
        body = read_json_body_from(environ, state.settings.max_body_bytes)
        row, corrected = parse_heartbeat(body, device_id, state.settings, datetime.now(UTC))
        stored = writer.write(row, arrived)
        observe_heartbeat(stored, time.monotonic() - arrived)
    finally:
        writer.release()
    return {
        "status": "stored" if stored else "duplicate",
        "device_id": device_id,
        "bucket_ts": row.bucket_ts,
        "clock_skew_s": row.clock_skew_s,
        "skew_corrected": corrected,
    }


def _authenticated(state: AppState, environ: dict[str, Any]) -> int:
    """The device of the request's token, within the failed-authentication and per-device
    limits (429 before any look-up or database work)."""
    source = client_address(environ, state.trusted_proxies)
    state.auth_failures.check(source)  # 429 for a source that keeps failing, before any look-up
    try:
        device_id = state.tokens.authenticate(bearer_token_from(environ))
    except ApiError:
        state.auth_failures.failed(source)
        raise
    state.device_limit.admit(device_id)  # 429 over DEVICE_MAX_PER_MINUTE, before any database work
    return device_id


@bp.after_request
def count_rejected_heartbeats(response: Response) -> Response:
    """Every error answer to POST /v1/heartbeat counts as a rejection, by its error code."""
    if response.status_code >= 400 and request.endpoint == "heartbeats.post_heartbeat":
        reject_heartbeat(getattr(response, "error_code", "") or f"http_{response.status_code}")
    return response
