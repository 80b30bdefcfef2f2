"""Webhooks (operator): register, list, delete, and each one's delivery log."""

from __future__ import annotations

import secrets

from flask import Blueprint, Response, request

from api.auth import admin_required, requires_role
from api.body import decode_body
from api.errors import ApiError
from api.query_args import int_query
from api.responses import json_response
from api.schemas import DELIVERIES_BEFORE, DELIVERIES_LIMIT, WebhookIn
from api.state import current_state
from db.engine import reading
from db.webhooks import create_webhook, delete_webhook, list_deliveries, list_webhooks

bp = Blueprint("webhooks", __name__)

WEBHOOK_MAX_BODY_BYTES = 16_384
DELIVERY_STATUSES = ("pending", "delivered", "failed", "cancelled")


@bp.post("/v1/webhooks")
@requires_role("admin", audit="webhook.create")
def create() -> Response:
    """Register a webhook for some event types (all when none); the secret is shown once."""
    spec = decode_body(WEBHOOK_MAX_BODY_BYTES, WebhookIn)
    secret = spec.secret or "whsec_" + secrets.token_urlsafe(32)
    with current_state().engine.begin() as conn:
        hook = create_webhook(conn, spec.url, sorted(set(spec.event_types)), secret)
    return json_response({**hook, "secret": secret}, status=201)


@bp.get("/v1/webhooks")
@admin_required
def index() -> Response:
    """Active webhooks (without their secrets) and their pending deliveries."""
    with reading(current_state().engine) as conn:
        return json_response({"webhooks": list_webhooks(conn)})


@bp.delete("/v1/webhooks/<int:webhook_id>")
@requires_role("admin", audit="webhook.delete")
def delete(webhook_id: int) -> Response:
    """Stop a webhook; its pending deliveries are cancelled, its log stays readable."""
    with current_state().engine.begin() as conn:
        return json_response(delete_webhook(conn, webhook_id))


@bp.get("/v1/webhooks/<int:webhook_id>/deliveries")
@admin_required
def deliveries(webhook_id: int) -> Response:
    """The delivery log, newest first (?status=, ?before=, ?limit= up to 500)."""
    status = request.args.get("status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise ApiError(400, "invalid_parameter", f"status must be one of {', '.join(DELIVERY_STATUSES)}")
    before = int_query(DELIVERIES_BEFORE)
    limit = int_query(DELIVERIES_LIMIT)
    with reading(current_state().engine) as conn:
        rows, cursor = list_deliveries(conn, webhook_id, status=status, before=before, limit=limit)
    return json_response({"deliveries": rows, "next_before": cursor})
