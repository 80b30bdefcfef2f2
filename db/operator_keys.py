"""Queries on operator_keys: named operator keys with a role, stored only as SHA-256 hashes.

Every function takes the connection first and never commits: the caller owns the transaction.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg2 import errors as pg_errors
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from db.errors import DataError

KEY_PREFIX = "nxk_"
# Each role can do what the ones before it can.
ROLES = ("viewer", "operator", "admin")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


class KeyNameTaken(DataError):
    def __init__(self, name: str) -> None:
        super().__init__(f"an operator key named {name!r} exists already")
        self.name = name


class KeyNotFound(DataError):
    def __init__(self, ref: int | str) -> None:
        super().__init__(f"operator key {ref!r} not found")
        self.ref = ref


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` may do what ``needed`` may (viewer < operator < admin)."""
    return ROLES.index(role) >= ROLES.index(needed)


def hash_key(key: str) -> bytes:
    """SHA-256 of a key: keys are 256 random bits, so a fast hash is enough."""
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class OperatorKey:
    id: int
    name: str
    role: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None


_COLUMNS = "id, name, role, created_at, created_by, revoked_at"


def create_key(conn: Connection, name: str, role: str, created_by: str) -> tuple[OperatorKey, str]:
    """A new key: its record and the key itself (shown once, never stored)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError("name: 1-64 letters, digits, '_', '.', '@', '-', starting with a letter or digit")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        with conn.begin_nested():
            row = conn.exec_driver_sql(
                f"INSERT INTO operator_keys (name, role, key_hash, created_by) "
                f"VALUES (%(n)s, %(r)s, %(h)s, %(by)s) RETURNING {_COLUMNS}",
                {"n": name, "r": role, "h": hash_key(key), "by": created_by},
            ).one()
    except IntegrityError as exc:
        if isinstance(exc.orig, pg_errors.UniqueViolation):
            raise KeyNameTaken(name) from None
        raise
    return OperatorKey(*row), key


def list_keys(conn: Connection) -> list[OperatorKey]:
    """Every key, revoked ones included, oldest first."""
    return [OperatorKey(*r) for r in conn.exec_driver_sql(f"SELECT {_COLUMNS} FROM operator_keys ORDER BY id")]


def revoke_key(conn: Connection, ref: int | str) -> OperatorKey:
    """Revoke a key by id or name (idempotent); KeyNotFound when there is none."""
    column = "id" if isinstance(ref, int) else "name"
    row = conn.exec_driver_sql(
        f"UPDATE operator_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE {column} = %(ref)s "
        f"RETURNING {_COLUMNS}",
        {"ref": ref},
    ).first()
    if row is None:
        raise KeyNotFound(ref)
    return OperatorKey(*row)


def active_key(conn: Connection, key_hash: bytes) -> OperatorKey | None:
    """The key with this hash, unless revoked (one unique-index read)."""
    row = conn.exec_driver_sql(
        f"SELECT {_COLUMNS} FROM operator_keys WHERE key_hash = %(h)s AND revoked_at IS NULL", {"h": key_hash}
    ).first()
    return OperatorKey(*row) if row is not None else None


def key_to_dict(key: OperatorKey) -> dict[str, Any]:
    """A key's record as JSON-ready fields (never the key)."""
    return {"id": key.id, "name": key.name, "role": key.role, "created_at": key.created_at,
            "created_by": key.created_by, "revoked_at": key.revoked_at}
