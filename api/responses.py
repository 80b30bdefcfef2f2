"""JSON answers encoded with msgspec (fast, and datetimes as RFC 3339)."""

from __future__ import annotations

from typing import Any

import msgspec
from flask import Response

from db.reads import ReadSource

_encoder = msgspec.json.Encoder()
# For every answer that carries a secret (a device token, an operator key): no cache on the way
# (a proxy, a browser, a debugging tool's history) may keep a copy.
NO_STORE = {"Cache-Control": "no-store"}


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON Response of any msgspec-encodable payload."""
    response = Response(_encoder.encode(payload), status=status, mimetype="application/json")
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def with_source(body: dict[str, Any], source: ReadSource) -> dict[str, Any]:
    """A read's answer, saying where it came from (``source``) and the replica's lag then."""
    body["source"] = source.name
    body["replica_lag_s"] = source.replica_lag_s
    return body
