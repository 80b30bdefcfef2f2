"""The two planes of one codebase: which blueprints each serves, and the 404 that names the
right plane when a client asks one plane for the other's endpoint.

The device plane (HOST:PORT, reached by devices from the internet) serves POST /v1/heartbeat,
/healthz and /readyz, and runs no jobs. The operator plane (ADMIN_HOST:ADMIN_PORT) serves the
admin API, /metrics, /ops/*, /openapi.json, /healthz, /readyz, and runs the scheduler. "all"
serves both from one process (the single-plane layout, and tests with the Flask test client).
"""

from __future__ import annotations

from functools import cache

from flask import Blueprint, Flask, request
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule

from api.errors import ApiError

PLANE_NAMES = {"device": "device plane (HOST:PORT)", "operator": "operator plane (ADMIN_HOST:ADMIN_PORT)"}


def blueprints() -> dict[str, list[Blueprint]]:
    """The blueprints of each plane (health on both: each plane's own liveness and readiness)."""
    from api.openapi import bp as openapi_bp
    from api.routes.audit import bp as audit_bp
    from api.routes.devices import bp as devices_bp
    from api.routes.events import bp as events_bp
    from api.routes.fleet import bp as fleet_bp
    from api.routes.health import bp as health_bp
    from api.routes.heartbeats import bp as heartbeats_bp
    from api.routes.history import bp as history_bp
    from api.routes.keys import bp as keys_bp
    from api.routes.observability import bp as observability_bp
    from api.routes.ops import bp as ops_bp
    from api.routes.webhooks import bp as webhooks_bp

    return {
        "device": [health_bp, heartbeats_bp],
        "operator": [health_bp, devices_bp, history_bp, fleet_bp, openapi_bp, ops_bp, observability_bp, events_bp,
                     webhooks_bp, keys_bp, audit_bp],
    }


def plane_blueprints(plane: str) -> list[Blueprint]:
    """The blueprints a process of ``plane`` registers (each once, in a stable order)."""
    planes = blueprints()
    if plane == "all":
        return list(dict.fromkeys(planes["device"] + planes["operator"]))
    return planes[plane]


@cache
def _rules_of(plane: str) -> Map:
    """The URL rules of a plane, taken from a throwaway app that registers its blueprints."""
    shadow = Flask("nexmdm-plane-" + plane)
    for bp in plane_blueprints(plane):
        shadow.register_blueprint(bp)
    rules = [Rule(r.rule, methods=r.methods, endpoint=r.endpoint)
             for r in shadow.url_map.iter_rules() if r.endpoint != "static"]
    return Map(rules)


def plane_of(method: str, path: str) -> str | None:
    """Which plane serves ``method path``: "device", "operator", "both", or None."""
    found = [plane for plane in ("device", "operator") if _matches(_rules_of(plane), method, path)]
    if len(found) == 2:
        return "both"
    return found[0] if found else None


def _matches(rules: Map, method: str, path: str) -> bool:
    try:
        rules.bind("localhost").match(path, method=method)
    except MethodNotAllowed:
        return False
    except NotFound:
        return False
    return True


def configure_plane(app: Flask, plane: str) -> None:
    """Register ``plane``'s blueprints; an endpoint of the other plane answers a JSON 404
    (``wrong_plane``) that names the plane serving it."""
    for bp in plane_blueprints(plane):
        app.register_blueprint(bp)
    if plane == "all":
        return
    other = "operator" if plane == "device" else "device"
    other_rules = _rules_of(other)

    @app.before_request
    def _wrong_plane() -> None:
        # Flask routes before this hook and raises the routing error only when dispatching.
        if isinstance(request.routing_exception, NotFound) and _matches(other_rules, request.method, request.path):
            raise ApiError(
                404, "wrong_plane",
                f"{request.method} {request.path} is served by the {PLANE_NAMES[other]}, not by this "
                f"{PLANE_NAMES[plane]}",
            )
