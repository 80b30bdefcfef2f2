"""Operator keys (admin): create one (shown once), list them, revoke one. Each change is audited."""

from __future__ import annotations

from flask import Blueprint, Response

from api.audit import audit_change
from api.auth import admin_required, current_principal, requires_role
from api.body import decode_body
from api.errors import ApiError
from api.openapi import Operation
from api.responses import NO_STORE, json_response
from api.schemas import KeyCreatedOut, KeyIn, KeyList, OperatorKeyOut
from api.state import current_state
from db.engine import reading, transaction
from db.operator_keys import create_key, key_to_dict, list_keys, revoke_key

bp = Blueprint("keys", __name__)

KEY_MAX_BODY_BYTES = 4096


@bp.post("/v1/keys")
@requires_role("admin", audit="key.create")
def create() -> Response:
    """A new named operator key with a role; the key is in this answer only."""
    body = decode_body(KEY_MAX_BODY_BYTES, KeyIn)
    principal = current_principal()
    assert principal is not None
    with transaction(current_state().engine) as conn:
        try:
            record, key = create_key(conn, body.name, body.role, created_by=principal.name)
        except ValueError as exc:
            raise ApiError(422, "validation_failed", str(exc)) from None
        audit_change(conn, target=f"key:{record.id}", detail={"name": record.name, "role": record.role})
    return json_response({"key": key, **key_to_dict(record)}, status=201, headers=NO_STORE)


@bp.get("/v1/keys")
@admin_required
def list_all() -> Response:
    """Every operator key (never the key itself), revoked ones included."""
    with reading(current_state().engine) as conn:
        return json_response({"keys": [key_to_dict(k) for k in list_keys(conn)]})


@bp.post("/v1/keys/<int:key_id>/revoke")
@requires_role("admin", audit="key.revoke")
def revoke(key_id: int) -> Response:
    """Revoke a key (idempotent): refused on every worker from the next request on."""
    with transaction(current_state().engine) as conn:
        record = revoke_key(conn, key_id)
        audit_change(conn, detail={"name": record.name, "role": record.role})
    return json_response(key_to_dict(record))


# This module's operations in /openapi.json (api.openapi.operations() gathers them).
OPERATIONS = (
    Operation("post", "/v1/keys", "Create a named operator key with a role (shown once)", "admin",
              request=KeyIn, response=KeyCreatedOut, status=201, errors=(400, 401, 403, 409, 413, 415, 422)),
    Operation("get", "/v1/keys", "Operator keys (never the keys themselves)", "admin",
              response=KeyList, errors=(401, 403)),
    Operation("post", "/v1/keys/{key_id}/revoke", "Revoke an operator key", "admin",
              response=OperatorKeyOut, params=(("key_id", "path", "integer"),), errors=(401, 403, 404)),
)
