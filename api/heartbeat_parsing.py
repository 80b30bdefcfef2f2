"""A heartbeat body → a row to store: decode, validate, keep unknown fields, choose the dedup bucket."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import msgspec.inspect

from api.body import decode_json
from api.errors import ApiError
from api.schemas import HeartbeatIn
from config.settings import Settings
from db.heartbeats import HeartbeatRow

_KNOWN_FIELDS = frozenset(HeartbeatIn.__struct_fields__)
# What the device reports that is stored as sent (sent_at is normalised to UTC first): a field
# added to HeartbeatIn and HeartbeatRow flows through here without an edit.
_REPORTED_AS_IS = tuple(name for name in HeartbeatIn.__struct_fields__ if name != "sent_at")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


MAX_EXTRA_DEPTH = 8


def _nesting_depth(value: Any) -> int:
    """How deeply lists and objects nest in a decoded JSON value (a scalar is 0, {} is 1)."""
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            return depth
        depth += 1
        level = [child for v in containers for child in (v.values() if isinstance(v, dict) else v)]


def floor_to_bucket(ts: datetime, bucket_s: int) -> datetime:
    """``ts`` floored to a multiple of ``bucket_s`` seconds since the epoch (UTC)."""
    seconds = int((ts - _EPOCH).total_seconds() // bucket_s) * bucket_s
    return _EPOCH + timedelta(seconds=seconds)


def choose_bucket(sent_at: datetime, now: datetime, bucket_s: int, max_skew_s: int) -> tuple[datetime, float, bool]:
    """(bucket, skew in seconds, corrected?). The device clock decides the bucket, so a retry of
    the same body lands in the same bucket.

    A clock more than ``max_skew_s`` off the server's is corrected by its skew rounded to whole
    hours (a wrong time zone, or a clock years off): the bucket stays within half an hour of
    the server's time (so inside an existing partition) and still follows the body's
    ``sent_at``, so a retry seconds later maps to the same bucket unless the skew sits within
    seconds of a half-hour mark. Using the server's arrival time instead would split retries
    that straddle a bucket boundary into two stored rows.
    """
    skew_s = (now - sent_at).total_seconds()
    if abs(skew_s) <= max_skew_s:
        return floor_to_bucket(sent_at, bucket_s), skew_s, False
    correction = timedelta(hours=round(skew_s / 3600))
    return floor_to_bucket(sent_at + correction, bucket_s), skew_s, True


def _integer_fields(struct: type) -> frozenset[str]:
    """The fields of a msgspec Struct that hold integers (optional ones included)."""
    names = set()
    for f in msgspec.inspect.type_info(struct).fields:
        kinds = f.type.types if isinstance(f.type, msgspec.inspect.UnionType) else (f.type,)
        if any(isinstance(k, msgspec.inspect.IntType) for k in kinds):
            names.add(f.encode_name)
    return frozenset(names)


_INTEGER_FIELDS = _integer_fields(HeartbeatIn)


def _integral_floats_as_ints(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with 80.0 read as 80 in integer fields (JSON Schema's integers, and the document's:
    a number with no fraction is one); ``raw`` itself when there is none. Only on the error path."""
    fixed = {k: int(v) for k, v in raw.items()
             if k in _INTEGER_FIELDS and isinstance(v, float) and v.is_integer() and abs(v) < 2**63}
    return {**raw, **fixed} if fixed else raw


def parse_heartbeat(body: bytes, device_id: int, settings: Settings, now: datetime) -> tuple[HeartbeatRow, bool]:
    """Validate a heartbeat body into a row; raises a 400/422 ApiError naming the problem."""
    raw = decode_json(body)
    if not isinstance(raw, dict):
        raise ApiError(422, "validation_failed", "the body must be a JSON object")
    try:
        hb = msgspec.convert(raw, HeartbeatIn)
    except msgspec.ValidationError as exc:
        whole = _integral_floats_as_ints(raw)
        if whole is raw:
            raise ApiError(422, "validation_failed", str(exc)) from None
        try:
            hb = msgspec.convert(whole, HeartbeatIn)
        except msgspec.ValidationError as again:
            raise ApiError(422, "validation_failed", str(again)) from None
    extra_json = None
    if len(raw) > len(_KNOWN_FIELDS) or not _KNOWN_FIELDS.issuperset(raw):
        extra = {k: v for k, v in raw.items() if k not in _KNOWN_FIELDS}
        if extra:
            if _nesting_depth(extra) > MAX_EXTRA_DEPTH:
                raise ApiError(422, "extra_too_deep", f"fields beyond the schema nest deeper than {MAX_EXTRA_DEPTH}")
            encoded = msgspec.json.encode(extra)
            if len(encoded) > settings.max_extra_bytes:
                raise ApiError(
                    422, "extra_too_large",
                    f"fields beyond the schema take {len(encoded)} bytes; at most {settings.max_extra_bytes}",
                )
            extra_json = msgspec.Raw(encoded)
    try:
        # In UTC: PostgreSQL refuses zone offsets beyond 15:59 that Python accepts.
        sent_at = hb.sent_at.astimezone(UTC)
    except OverflowError:
        raise ApiError(422, "validation_failed", "sent_at is out of range") from None
    bucket, skew_s, corrected = choose_bucket(
        sent_at, now, settings.dedup_bucket_seconds, settings.max_clock_skew_seconds
    )
    row = HeartbeatRow(
        device_id=device_id,
        bucket_ts=bucket,
        sent_at=sent_at,
        received_at=now,
        clock_skew_s=round(skew_s, 3),
        extra_json=extra_json,
        **{name: getattr(hb, name) for name in _REPORTED_AS_IS},
    )
    return row, corrected
