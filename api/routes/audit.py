"""GET /v1/audit (admin): the audit trail of operator changes, newest first."""

from __future__ import annotations

from flask import Blueprint, Response, request

from api.auth import admin_required
from api.openapi import Operation
from api.query_args import int_query, text_query
from api.responses import json_response
from api.schemas import AUDIT_ACTION, AUDIT_BEFORE, AUDIT_LIMIT, AuditPage
from api.state import current_state
from db.audit import list_audit
from db.engine import reading

bp = Blueprint("audit", __name__)


@bp.get("/v1/audit")
@admin_required
def audit_log() -> Response:
    """Audit rows newest first (?action=, ?before= the previous page's next_before, ?limit= up to 500)."""
    before = int_query(AUDIT_BEFORE) if AUDIT_BEFORE.name in request.args else None
    limit = int_query(AUDIT_LIMIT)
    action = text_query(AUDIT_ACTION)
    with reading(current_state().engine) as conn:
        entries, next_before = list_audit(conn, before_id=before, limit=limit, action=action)
    return json_response({"entries": entries, "next_before": next_before})


# This module's operations in /openapi.json (api.openapi.operations() gathers them).
OPERATIONS = (
    Operation("get", "/v1/audit", "The audit trail of operator changes, newest first", "admin",
              response=AuditPage, params=(AUDIT_ACTION, AUDIT_BEFORE, AUDIT_LIMIT), errors=(400, 401, 403)),
)
