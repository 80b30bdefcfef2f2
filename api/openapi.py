"""GET /openapi.json: the OpenAPI 3.1 document, its schemas generated from api/schemas.py
(the same msgspec types that validate requests), its paths from the table below and the tables
of the route modules that describe their own operations (``operations()`` names them; nothing
adds to a table at import time)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from flask import Blueprint, Response

from api import schemas as s
from api.responses import json_response
from db.job_runs import RECORDED_JOBS

bp = Blueprint("openapi", __name__)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    auth: str | None  # "admin" | "device" | None
    request: Any = None  # a schema type, or a tuple of them (oneOf)
    response: Any = None
    status: int = 200
    # (name, in, type), (name, in, type, {extra JSON-schema keywords}), an IntQuery or a TextQuery
    params: tuple[Any, ...] = ()
    errors: tuple[int, ...] = field(default_factory=tuple)


OPERATIONS: tuple[Operation, ...] = (
    Operation("get", "/healthz", "Liveness", None, response=s.Health),
    Operation("get", "/openapi.json", "This document", None),
    Operation("get", "/readyz", "Readiness: the database answers", None, response=s.Health, errors=(503,)),
    Operation("post", "/v1/heartbeat", "Store a heartbeat (answered after COMMIT)", "device",
              request=s.HeartbeatIn, response=s.HeartbeatAck, errors=(400, 401, 413, 415, 422, 503)),
    Operation("post", "/v1/devices/enroll", "Enroll one device or a batch (up to 10,000)", "admin",
              request=(s.DeviceIn, s.EnrollBatchIn), response=s.EnrollOut, status=201,
              errors=(400, 401, 403, 409, 413, 415, 422)),
    Operation("post", "/v1/devices/{device_id}/token", "Rotate a device's token", "admin",
              response=s.TokenOut, status=201, params=(("device_id", "path", "integer"),), errors=(401, 403, 404)),
    Operation("post", "/v1/devices/{device_id}/revoke", "Revoke a device", "admin",
              response=s.RevokeOut, params=(("device_id", "path", "integer"),), errors=(401, 403, 404)),
    Operation("get", "/v1/devices/{device_id}", "Current status of one device", "admin",
              response=s.DeviceStatusRead, params=(("device_id", "path", "integer"),), errors=(401, 403, 404)),
    Operation("get", "/v1/devices", "Fleet list with filters and keyset pagination", "admin",
              response=s.DeviceList,
              params=(("status", "query", "string", {"enum": ["online", "offline"]}), s.DEVICES_BATTERY_BELOW,
                      s.DEVICES_APP_VERSION, s.DEVICES_LABEL,
                      s.DEVICES_AFTER, s.DEVICES_LIMIT),
              errors=(400, 401, 403)),
    Operation("get", "/v1/fleet/summary", "Counts for the whole fleet", "admin",
              response=s.FleetSummary, errors=(401, 403)),
    # History reads hot days (PostgreSQL) and cold days (Parquet) alike; 500 archive_corrupt when
    # a cold day's file does not match its manifest.
    Operation("get", "/v1/devices/{device_id}/heartbeats",
              "A device's heartbeat history (hot and archived days alike), paginated", "admin",
              response=s.HeartbeatHistory,
              params=(("device_id", "path", "integer"), ("since", "query", "string", {"format": "date-time"}),
                      ("until", "query", "string", {"format": "date-time"}), s.HISTORY_LIMIT,
                      ("order", "query", "string", {"enum": ["asc", "desc"]}),
                      ("source", "query", "string", {
                          "enum": list(s.READ_SOURCES), "default": "any",
                          "description": "any: the read replica while fresh enough (READ_MAX_LAG_S), else the "
                                         "primary; primary: always the primary, every committed heartbeat"})),
              errors=(400, 401, 403, 404, 500)),
    # Operations: run a job now (409 while another runner holds its lock; 500 with the report as
    # detail when it fails), and the recent runs.
    Operation("post", "/ops/partitions", "Run the partitions job now", "admin",
              response=s.JobRun, errors=(401, 403, 409, 500)),
    Operation("post", "/ops/nightly", "Run the nightly archive job now", "admin",
              response=s.JobRun, errors=(401, 403, 409, 500)),
    Operation("post", "/ops/reconcile", "Run the reconcile job now", "admin",
              response=s.JobRun, errors=(401, 403, 409, 500)),
    Operation("post", "/ops/events", "Run the events job now", "admin",
              response=s.JobRun, errors=(401, 403, 409, 500)),
    # Events: oldest first after ?after=, newest first with ?order=desc / ?before=.
    Operation("get", "/v1/events", "Fleet events, keyset-paginated", "admin", response=s.EventList,
              params=(s.EVENTS_TYPES, s.EVENTS_DEVICE_ID, ("since", "query", "string", {"format": "date-time"}),
                      ("until", "query", "string", {"format": "date-time"}), s.EVENTS_AFTER, s.EVENTS_BEFORE,
                      ("order", "query", "string", {"enum": ["asc", "desc"]}), s.EVENTS_LIMIT),
              errors=(400, 401, 403, 404)),  # 404: ?device_id= of no device
    Operation("get", "/v1/devices/{device_id}/events", "One device's events", "admin", response=s.EventList,
              params=(("device_id", "path", "integer"), s.EVENTS_TYPES,
                      ("since", "query", "string", {"format": "date-time"}),
                      ("until", "query", "string", {"format": "date-time"}), s.EVENTS_AFTER, s.EVENTS_BEFORE,
                      ("order", "query", "string", {"enum": ["asc", "desc"]}), s.EVENTS_LIMIT),
              errors=(400, 401, 403, 404)),
    Operation("post", "/v1/webhooks", "Register a webhook (the secret is shown once)", "admin",
              request=s.WebhookIn, response=s.WebhookCreated, status=201, errors=(400, 401, 403, 413, 415, 422)),
    Operation("get", "/v1/webhooks", "Active webhooks", "admin", response=s.WebhookList, errors=(401, 403)),
    Operation("delete", "/v1/webhooks/{webhook_id}", "Stop a webhook; pending deliveries are cancelled", "admin",
              response=s.WebhookDeleted, params=(("webhook_id", "path", "integer"),), errors=(401, 403, 404)),
    Operation("get", "/v1/webhooks/{webhook_id}/deliveries", "A webhook's delivery log, newest first", "admin",
              response=s.WebhookDeliveryList,
              params=(("webhook_id", "path", "integer"),
                      ("status", "query", "string", {"enum": ["pending", "delivered", "failed", "cancelled"]}),
                      s.DELIVERIES_BEFORE, s.DELIVERIES_LIMIT),
              errors=(400, 401, 403, 404)),
    Operation("get", "/ops/jobs", "Recent job runs, newest first", "admin", response=s.JobRunList,
              params=(("job", "query", "string", {"enum": list(RECORDED_JOBS)}), s.JOBS_LIMIT),
              errors=(400, 401, 403)),
)


def parameter(param: Any) -> dict[str, Any]:
    """One entry of an operation's ``parameters``."""
    if isinstance(param, s.IntQuery):
        schema = {"type": "integer", "minimum": param.lo, "maximum": param.hi}
        return {"name": param.name, "in": "query", "required": False, "schema": schema}
    if isinstance(param, s.TextQuery):
        return {"name": param.name, "in": "query", "required": False,
                "schema": {"type": "string", "pattern": param.pattern}}
    name, where, type_name, *extra = param
    return {"name": name, "in": where, "required": where == "path", "schema": {"type": type_name, **(extra or [{}])[0]}}


def error_statuses(op: Operation) -> list[int]:
    """What an operation can answer besides success: its own errors, and for every operation
    behind a key or token 503 (the key or token is looked up in the database) and 429 (a source
    that keeps failing to authenticate, a device over DEVICE_MAX_PER_MINUTE: api/throttle.py)."""
    codes = set(op.errors)
    if op.auth is not None:
        codes.update((429, 503))
    return sorted(codes)


def operations() -> tuple[Operation, ...]:
    """Every operation of the document: the table above and those of the route modules that
    keep their own (imported here, not at the top: they import Operation from this module)."""
    from api.routes import audit, keys, observability

    return OPERATIONS + audit.OPERATIONS + keys.OPERATIONS + observability.OPERATIONS


def _plane(op: Operation) -> str:
    """Which plane serves an operation: device, operator, or both (api/planes.py)."""
    from api.planes import plane_of

    return plane_of(op.method.upper(), op.path.replace("{device_id}", "1")) or "operator"


def build_document() -> dict[str, Any]:
    """The whole OpenAPI document."""
    ops = operations()
    types: list[Any] = [s.Error]
    for op in ops:
        if isinstance(op.request, tuple):
            types.extend(op.request)
        elif op.request is not None:
            types.append(op.request)
        if op.response is not None:
            types.append(op.response)
    refs, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    lookup = dict(zip(map(id, types), refs, strict=True))  # same type twice → same ref
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        entry: dict[str, Any] = {"summary": op.summary, "responses": {}, "x-nexmdm-plane": _plane(op)}
        if op.auth == "admin":
            entry["security"] = [{"adminKey": []}]
        elif op.auth == "device":
            entry["security"] = [{"deviceToken": []}]
        if op.params:
            entry["parameters"] = [parameter(p) for p in op.params]
        if op.request is not None:
            if isinstance(op.request, tuple):
                schema = {"oneOf": [lookup[id(t)] for t in op.request]}
            else:
                schema = lookup[id(op.request)]
            entry["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        ok: dict[str, Any] = {"description": "OK"}
        if op.response is not None:
            ok["content"] = {"application/json": {"schema": lookup[id(op.response)]}}
        entry["responses"][str(op.status)] = ok
        for code in error_statuses(op):
            entry["responses"][str(code)] = {
                "description": "error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "NexMDM", "version": "1.0.0",
                 "description": "Fleet heartbeat backend. Errors are JSON {error, detail}. Two planes: "
                                "x-nexmdm-plane says whether an operation is served by the device plane "
                                "(HOST:PORT), the operator plane (ADMIN_HOST:ADMIN_PORT), or both."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "adminKey": {"type": "apiKey", "in": "header", "name": "x-admin"},
                "deviceToken": {"type": "http", "scheme": "bearer"},
            },
        },
    }


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI document (no auth: it holds no secrets)."""
    return json_response(build_document())
