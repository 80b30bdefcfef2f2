"""Queries on the devices table: enrollment, token look-up, rotation, revocation.

Every function takes the connection first and never commits: the caller owns the transaction.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from db.errors import DeviceNotFound, DuplicateDevice

TOKEN_PREFIX = "nxm_"


def new_token() -> str:
    """A fresh bearer token: 256 bits of randomness, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    """SHA-256 of a token. Tokens are random, so a fast hash is enough (no password KDF)."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class NewDevice:
    device_uid: str
    name: str | None = None
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnrolledDevice:
    id: int
    device_uid: str
    token: str


@dataclass(frozen=True)
class TokenOwner:
    """Who a token belongs to, and until when it is valid (None: until rotated or revoked)."""

    device_id: int
    valid_until: datetime | None


def enroll_devices(conn: Connection, devices: list[NewDevice]) -> list[EnrolledDevice]:
    """Insert devices with fresh tokens in one statement; raises DuplicateDevice if any
    device_uid is already enrolled (then nothing is inserted once the caller rolls back)."""
    if not devices:
        return []
    tokens = [new_token() for _ in devices]
    cursor = conn.exec_driver_sql(
        """
        INSERT INTO devices (device_uid, name, labels, token_hash)
        SELECT uid, name, COALESCE(string_to_array(labels, E'\\x1f'), '{}'), token_hash
        FROM unnest(%(uids)s::text[], %(names)s::text[], %(labels)s::text[], %(hashes)s::bytea[])
             WITH ORDINALITY AS t(uid, name, labels, token_hash, ord)
        ORDER BY ord
        ON CONFLICT (device_uid) DO NOTHING
        RETURNING id, device_uid
        """,
        {
            "uids": [d.device_uid for d in devices],
            "names": [d.name for d in devices],
            "labels": ["\x1f".join(d.labels) if d.labels else None for d in devices],
            "hashes": [hash_token(t) for t in tokens],
        },
    )
    ids = {uid: device_id for device_id, uid in cursor.fetchall()}
    missing = [d.device_uid for d in devices if d.device_uid not in ids]
    if missing:
        raise DuplicateDevice(missing)
    return [EnrolledDevice(ids[d.device_uid], d.device_uid, t) for d, t in zip(devices, tokens, strict=True)]


def find_token_owners(conn: Connection, token_hashes: list[bytes]) -> dict[bytes, TokenOwner]:
    """The devices these token hashes authenticate (the current token, or the previous one
    within its overlap; never a revoked device), in one statement. Unknown ones are absent."""
    rows = conn.exec_driver_sql(
        """
        SELECT token_hash, id, NULL::timestamptz FROM devices
        WHERE token_hash = ANY(%(hs)s) AND revoked_at IS NULL
        UNION ALL
        SELECT prev_token_hash, id, prev_token_expires_at FROM devices
        WHERE prev_token_hash = ANY(%(hs)s) AND prev_token_expires_at > now() AND revoked_at IS NULL
        """,
        {"hs": token_hashes},
    ).fetchall()
    owners: dict[bytes, TokenOwner] = {}
    for digest, device_id, valid_until in rows:
        owners.setdefault(bytes(digest), TokenOwner(device_id, valid_until))
    return owners


def rotate_token(conn: Connection, device_id: int, overlap_s: int) -> tuple[str, datetime]:
    """Give a device a new token; the old one keeps working for ``overlap_s`` seconds.
    Returns the new token and when the old one stops."""
    token = new_token()
    row = conn.exec_driver_sql(
        """
        UPDATE devices
        SET prev_token_hash = token_hash,
            prev_token_expires_at = now() + make_interval(secs => %(overlap)s),
            token_hash = %(h)s,
            auth_changed_at = clock_timestamp()
        WHERE id = %(id)s AND revoked_at IS NULL
        RETURNING prev_token_expires_at
        """,
        {"h": hash_token(token), "id": device_id, "overlap": overlap_s},
    ).first()
    if row is None:
        raise DeviceNotFound(device_id)
    return token, row[0]


def revoke_device(conn: Connection, device_id: int) -> datetime:
    """Revoke every token of a device (idempotent); returns when it was revoked."""
    row = conn.exec_driver_sql(
        "UPDATE devices SET revoked_at = COALESCE(revoked_at, now()), auth_changed_at = clock_timestamp() "
        "WHERE id = %(id)s RETURNING revoked_at",
        {"id": device_id},
    ).first()
    if row is None:
        raise DeviceNotFound(device_id)
    return row[0]


def changed_devices(conn: Connection, since: datetime | None) -> tuple[list[int], datetime]:
    """Ids of devices whose tokens changed (rotated, revoked) after ``since`` (all-time when
    None), and the database's current time to pass as ``since`` next time.

    By device, not by token hash: a cache must drop every token it holds for such a device,
    including ones the database no longer knows (the token from two rotations back)."""
    now, ids = conn.exec_driver_sql(
        """
        SELECT clock_timestamp(), array_agg(id) FROM devices
        WHERE auth_changed_at > COALESCE(%(since)s, '-infinity'::timestamptz)
        """,
        {"since": since},
    ).one()
    return list(ids or []), now


def count_devices(conn: Connection) -> int:
    """How many devices are enrolled (revoked ones included)."""
    return conn.exec_driver_sql("SELECT count(*) FROM devices").scalar_one()


__all__ = [
    "EnrolledDevice",
    "NewDevice",
    "TokenOwner",
    "changed_devices",
    "count_devices",
    "enroll_devices",
    "find_token_owners",
    "hash_token",
    "new_token",
    "revoke_device",
    "rotate_token",
]
