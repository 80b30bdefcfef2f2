"""Enrollment, token rotation, revocation, one device's status, the fleet list (admin)."""

from __future__ import annotations

import msgspec
from flask import Blueprint, Response, request

from api.audit import audit_change
from api.auth import requires_role
from api.body import decode_json, read_json_body
from api.errors import ApiError
from api.metrics import timed_read
from api.query_args import int_query, text_query
from api.responses import NO_STORE, json_response, with_source
from api.schemas import (
    DEVICES_AFTER,
    DEVICES_APP_VERSION,
    DEVICES_BATTERY_BELOW,
    DEVICES_LABEL,
    DEVICES_LIMIT,
    DeviceIn,
    EnrollBatchIn,
)
from api.state import current_state
from db.devices import NewDevice, enroll_devices, revoke_device, rotate_token
from db.engine import transaction
from db.fleet import FleetFilter, get_device_status, list_devices

bp = Blueprint("devices", __name__)

ENROLL_MAX_BODY_BYTES = 4 * 1024 * 1024


@bp.post("/v1/devices/enroll")
@requires_role("admin", audit="device.enroll")
def enroll() -> Response:
    """Enroll one device (a DeviceIn object) or a batch ({"devices": [...]}); tokens shown once."""
    state = current_state()
    raw = decode_json(read_json_body(ENROLL_MAX_BODY_BYTES))
    try:
        if isinstance(raw, dict) and "devices" in raw:
            batch = msgspec.convert(raw, EnrollBatchIn).devices
        else:
            batch = [msgspec.convert(raw, DeviceIn)]
    except msgspec.ValidationError as exc:
        raise ApiError(422, "validation_failed", str(exc)) from None
    if len(batch) > state.settings.max_enroll_batch:
        raise ApiError(422, "validation_failed", f"at most {state.settings.max_enroll_batch} devices per request")
    seen: set[str] = set()
    repeated = sorted({d.device_uid for d in batch if d.device_uid in seen or seen.add(d.device_uid)})
    if repeated:
        # A conflict like enrolling an enrolled uid (409): each entry is valid on its own.
        raise ApiError(409, "duplicate_in_batch", {"device_uids": repeated[:100]})
    new = [NewDevice(d.device_uid, d.name, tuple(d.labels)) for d in batch]
    with transaction(state.engine) as conn:
        enrolled = enroll_devices(conn, new)
        audit_change(conn, target=f"devices:{len(enrolled)}",
                     detail={"devices": [{"id": e.id, "device_uid": e.device_uid} for e in enrolled[:100]]})
    return json_response(
        {"devices": [{"id": e.id, "device_uid": e.device_uid, "token": e.token} for e in enrolled]},
        status=201, headers=NO_STORE,
    )


@bp.post("/v1/devices/<int:device_id>/token")
@requires_role("operator", audit="device.rotate")
def rotate(device_id: int) -> Response:
    """A new token; the old one keeps working for TOKEN_ROTATION_OVERLAP_S seconds."""
    state = current_state()
    with transaction(state.engine) as conn:
        token, old_valid_until = rotate_token(conn, device_id, state.settings.token_rotation_overlap_s)
        audit_change(conn, detail={"previous_token_valid_until": old_valid_until.isoformat()})
    state.tokens.evict_device(device_id)
    return json_response(
        {"device_id": device_id, "token": token, "previous_token_valid_until": old_valid_until},
        status=201, headers=NO_STORE,
    )


@bp.post("/v1/devices/<int:device_id>/revoke")
@requires_role("operator", audit="device.revoke")
def revoke(device_id: int) -> Response:
    """Revoke every token of a device (idempotent)."""
    state = current_state()
    with transaction(state.engine) as conn:
        revoked_at = revoke_device(conn, device_id)
        audit_change(conn, detail={"revoked_at": revoked_at.isoformat()})
    state.tokens.evict_device(device_id)
    return json_response({"device_id": device_id, "revoked_at": revoked_at})


@bp.get("/v1/devices/<int:device_id>")
@requires_role("viewer")
@timed_read("device")
def device_status(device_id: int) -> Response:
    """The current status of one device (one indexed row of device_last_status)."""
    state = current_state()
    status, source = state.reads.read(lambda conn: get_device_status(
        conn, device_id,
        offline_after_s=state.settings.offline_after_seconds,
        from_heartbeats=not state.settings.read_from_last_status,
    ))
    return json_response(with_source(status, source))


@bp.get("/v1/devices")
@requires_role("viewer")
@timed_read("list")
def fleet_list() -> Response:
    """The fleet, filtered (status, battery_below, app_version, label), keyset-paginated."""
    state = current_state()
    status = request.args.get("status")
    if status not in (None, "online", "offline"):
        raise ApiError(400, "invalid_parameter", "status must be 'online' or 'offline'")
    flt = FleetFilter(
        status=status or None,
        battery_below=int_query(DEVICES_BATTERY_BELOW) if DEVICES_BATTERY_BELOW.name in request.args else None,
        app_version=text_query(DEVICES_APP_VERSION),
        label=text_query(DEVICES_LABEL),
    )
    after = int_query(DEVICES_AFTER)
    limit = int_query(DEVICES_LIMIT)
    (rows, next_after), source = state.reads.read(lambda conn: list_devices(
        conn, flt, after_id=after, limit=limit,
        offline_after_s=state.settings.offline_after_seconds,
        from_heartbeats=not state.settings.read_from_last_status,
    ))
    return json_response(with_source({"devices": rows, "next_after": next_after}, source))
