"""Every exception → JSON answer mapping, in one place.

Bad input is a 4xx naming what was wrong; a database outage is a 503 with Retry-After (the
data layer's domain errors; db/errors.py alone decides what a driver fault means); an
unexpected exception is a JSON 500 without a stack trace (and, under testing, re-raised so a
hidden 500 cannot pass a test).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from db.cold import ColdFileCorrupt
from db.errors import (
    DRIVER_FAULTS,
    DatabaseUnavailable,
    DeviceNotFound,
    DuplicateDevice,
    Overloaded,
    WebhookNotFound,
    domain_error,
    fault_summary,
)
from db.operator_keys import KeyNameTaken, KeyNotFound

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: status, machine-readable code, detail."""

    def __init__(self, status: int, code: str, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


class ErrorResponse(Response):
    """A JSON error answer that keeps its code at hand (rejection metrics count by it)."""

    error_code: str = ""


def error_body(code: str, detail: Any) -> bytes:
    """The JSON of every error answer: ``{"error": code, "detail": detail}``."""
    return msgspec.json.encode({"error": code, "detail": detail})


def overloaded_answer(exc: Overloaded) -> tuple[str, list[tuple[str, str]], bytes]:
    """(status line, headers, body) of a load-shedding refusal, without Flask: the heartbeat's
    lean path answers it (api/heartbeat_wsgi.py), byte for byte as the handler below does."""
    body = error_body("overloaded", str(exc))
    return "503 SERVICE UNAVAILABLE", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                       ("Retry-After", str(exc.retry_after_s))], body


def error_response(status: int, code: str, detail: Any, headers: dict[str, str] | None = None) -> Response:
    """A JSON error answer with ``error_body``."""
    body = error_body(code, detail)
    response = ErrorResponse(body, status=status, mimetype="application/json")
    response.error_code = code
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}




# Domain errors answered with their message as the detail: (status, code).
_MESSAGE_ERRORS: dict[type[Exception], tuple[int, str]] = {
    DeviceNotFound: (404, "device_not_found"),
    WebhookNotFound: (404, "webhook_not_found"),
    KeyNotFound: (404, "key_not_found"),
    KeyNameTaken: (409, "key_name_taken"),
}


def _message_handler(status: int, code: str) -> Callable[[Exception], Response]:
    def handle(exc: Exception) -> Response:
        return error_response(status, code, str(exc))

    return handle


def configure_errors(app: Flask) -> None:
    """Register the handlers that turn every exception into a JSON answer."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    for error_type, (status, code) in _MESSAGE_ERRORS.items():
        app.register_error_handler(error_type, _message_handler(status, code))

    @app.errorhandler(DuplicateDevice)
    def _duplicate(exc: DuplicateDevice) -> Response:
        return error_response(409, "device_already_enrolled", {"device_uids": exc.device_uids[:100]})

    @app.errorhandler(ColdFileCorrupt)
    def _cold_corrupt(exc: ColdFileCorrupt) -> Response:
        # Not the client's fault and not worth a retry: an archived day's file does not match
        # its manifest. Refused, never served; `python -m scheduler verify` reports it too.
        log.error("cold tier: %s", exc)
        return error_response(500, "archive_corrupt", {"file": Path(exc.path).name, "reason": exc.reason})

    @app.errorhandler(Overloaded)
    @app.errorhandler(DatabaseUnavailable)
    def _retry_later(exc: Overloaded | DatabaseUnavailable) -> Response:
        # exc.code: overloaded, database_unavailable or pool_exhausted (db/errors.py)
        return error_response(503, exc.code, str(exc), {"Retry-After": str(exc.retry_after_s)})

    def _driver_fault(exc: Exception) -> Response:
        # A driver or pool fault from a path that did not pass through db's translated_faults:
        # db.errors.domain_error says what it means; none is a bug (500, re-raised under testing).
        error = domain_error(exc)
        if isinstance(error, DatabaseUnavailable):
            log.warning("database unavailable: %s", fault_summary(exc))
            return _retry_later(error)
        return _unexpected(exc)

    for fault in DRIVER_FAULTS:
        app.register_error_handler(fault, _driver_fault)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        # Werkzeug's own headers but its HTML Content-Type: e.g. the Allow of a 405 (RFC 9110).
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return error_response(status, code, exc.description, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        if app.testing:
            raise exc
        return error_response(500, "internal_error", "unexpected error; see the server log")
