"""Reading and decoding request bodies with a size limit and a JSON content type."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from flask import request

from api.errors import ApiError

T = TypeVar("T")


def read_json_body(limit_bytes: int) -> bytes:
    """The raw body; 415 unless JSON, 413 when over ``limit_bytes``, 400 when empty, 422 with NUL."""
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
    if request.content_length is not None and request.content_length > limit_bytes:
        raise ApiError(413, "body_too_large", f"the body is {request.content_length} bytes; at most {limit_bytes}")
    body = request.stream.read(limit_bytes + 1)
    if len(body) > limit_bytes:
        raise ApiError(413, "body_too_large", f"the body is over {limit_bytes} bytes")
    if not body:
        raise ApiError(400, "malformed_json", "the body is empty")
    # JSON can carry NUL only as the escape \u0000; PostgreSQL stores it in neither text nor
    # jsonb, so refuse it here rather than fail at INSERT time.
    if b"\\u0000" in body:
        raise ApiError(422, "validation_failed", "strings must not contain NUL (\\u0000)")
    return body


def decode_body(limit_bytes: int, schema: type[T]) -> T:
    """Read and validate a JSON body into ``schema``; 400 malformed, 422 invalid."""
    body = read_json_body(limit_bytes)
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", str(exc)) from None
    except RecursionError:
        raise ApiError(400, "malformed_json", "JSON nested too deeply") from None
    try:
        return msgspec.convert(raw, schema)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "validation_failed", str(exc)) from None
