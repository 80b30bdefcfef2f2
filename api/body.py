"""Reading and decoding request bodies with a size limit and a JSON content type."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from flask import request
from gunicorn.http.errors import ParseException

from api.errors import ApiError

T = TypeVar("T")


def read_json_body(limit_bytes: int) -> bytes:
    """The current request's raw body (see ``read_json_body_from``)."""
    return read_json_body_from(request.environ, limit_bytes)


def read_json_body_from(environ: dict[str, Any], limit_bytes: int) -> bytes:
    """The raw body; 415 unless JSON, 413 when over ``limit_bytes``, 400 when empty, 422 with NUL.

    Reads the WSGI environ directly (the heartbeat's lean path has no Flask request): on the
    hot path Werkzeug's lazily parsed request attributes (mimetype, stream wrappers) cost more
    than the JSON decoding.
    """
    mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    if mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
    stream = environ["wsgi.input"]
    raw_length = environ.get("CONTENT_LENGTH")
    if raw_length:
        try:
            length = int(raw_length)
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not a number") from None
        if length > limit_bytes:
            raise ApiError(413, "body_too_large", f"the body is {length} bytes; at most {limit_bytes}")
        body = _read(stream, length) if length > 0 else b""
    elif environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked" or environ.get("wsgi.input_terminated"):
        body = _read(stream, limit_bytes + 1)
        if len(body) > limit_bytes:
            raise ApiError(413, "body_too_large", f"the body is over {limit_bytes} bytes")
    else:
        body = b""
    if not body:
        raise ApiError(400, "malformed_json", "the body is empty")
    # JSON can carry NUL only as the escape \u0000; PostgreSQL stores it in neither text nor
    # jsonb, so refuse it here rather than fail at INSERT time.
    if b"\\u0000" in body:
        raise ApiError(422, "validation_failed", "strings must not contain NUL (\\u0000)")
    return body


def _read(stream: Any, size: int) -> bytes:
    try:
        return stream.read(size)
    except (ParseException, ValueError, OSError) as exc:  # a bad chunk size, a body cut short
        raise ApiError(400, "bad_request", f"the body could not be read: {type(exc).__name__}") from None


def reject_nul_in_query() -> None:
    """before_request: 400 for a NUL (%00) in the query string, which PostgreSQL refuses in text."""
    if "%00" in request.environ.get("QUERY_STRING", ""):
        raise ApiError(400, "invalid_parameter", "query parameters must not contain NUL (%00)")


def decode_json(body: bytes) -> Any:
    """Decode JSON bytes; 400 ApiError when malformed, not UTF-8, or nested too deeply."""
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ApiError(400, "malformed_json", f"JSON must be UTF-8: invalid byte at {exc.start}") from None
    except RecursionError:
        raise ApiError(400, "malformed_json", "JSON nested too deeply") from None


def decode_body(limit_bytes: int, schema: type[T]) -> T:
    """Read and validate a JSON body into ``schema``; 400 malformed, 422 invalid."""
    raw = decode_json(read_json_body(limit_bytes))
    try:
        return msgspec.convert(raw, schema)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "validation_failed", str(exc)) from None
