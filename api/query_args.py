"""Query-string parameters of the read endpoints, as declared once in api/schemas.py: an integer
in its range, a text matching its pattern, a time with a zone; 400 invalid_parameter naming the
parameter otherwise."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from flask import request

from api.errors import ApiError
from api.schemas import IntQuery, TextQuery


def int_arg(name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within [lo, hi], ``default`` when absent; 400 otherwise
    (an empty value too: ``?limit=`` is no integer)."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, "invalid_parameter", f"{name} must be between {lo} and {hi}")
    return value


def text_query(param: TextQuery) -> str | None:
    """A text query parameter matching its pattern, None when absent or empty; 400 otherwise."""
    raw = request.args.get(param.name)
    if raw is not None and not re.fullmatch(param.pattern, raw):
        raise ApiError(400, "invalid_parameter", f"{param.name} must match {param.pattern}")
    return raw or None


def int_query(param: IntQuery) -> int:
    """``int_arg`` for a parameter declared once in api/schemas.py."""
    return int_arg(param.name, param.default, param.lo, param.hi)


def time_arg(name: str, default: datetime | None) -> datetime | None:
    """An ISO 8601 query parameter with a time zone; 400 otherwise."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"{name} must be an ISO 8601 time, got {raw!r}") from None
    if value.tzinfo is None:
        raise ApiError(400, "invalid_parameter", f"{name} must carry a time zone (e.g. Z)")
    try:
        # In UTC: PostgreSQL refuses zone offsets beyond 15:59 that Python accepts (+20:00).
        return value.astimezone(UTC)
    except OverflowError:
        raise ApiError(400, "invalid_parameter", f"{name} is out of range") from None
