"""Queries on audit_log: who changed what, when, from where, with what outcome.

Every function takes the connection first and never commits: the caller owns the transaction
(a change and its audit row commit together).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from sqlalchemy import Connection

from db.paging import keyset_page

OUTCOMES = ("ok", "denied", "failed")


@dataclass(frozen=True)
class AuditRecord:
    """One row to write."""

    actor: str
    actor_role: str
    action: str
    outcome: str
    actor_key_id: int | None = None
    target: str | None = None
    source_addr: str | None = None
    detail: dict[str, Any] | None = field(default=None)


def record_audit(conn: Connection, entry: AuditRecord) -> int:
    """Insert one audit row; returns its id."""
    if entry.outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}")
    return conn.exec_driver_sql(
        """
        INSERT INTO audit_log (actor, actor_key_id, actor_role, action, target, source_addr, outcome, detail)
        VALUES (%(actor)s, %(key)s, %(role)s, %(action)s, %(target)s, %(addr)s, %(outcome)s, %(detail)s::jsonb)
        RETURNING id
        """,
        {"actor": entry.actor, "key": entry.actor_key_id, "role": entry.actor_role, "action": entry.action,
         "target": entry.target, "addr": entry.source_addr, "outcome": entry.outcome,
         "detail": msgspec.json.encode(entry.detail).decode() if entry.detail is not None else None},
    ).scalar_one()


def list_audit(
    conn: Connection, *, before_id: int | None, limit: int, action: str | None = None
) -> tuple[list[dict[str, Any]], int | None]:
    """Audit rows newest first, keyset-paginated: (rows, the ``before`` of the next page or None)."""
    rows = conn.exec_driver_sql(
        """
        SELECT id, at, actor, actor_key_id, actor_role, action, target, source_addr, outcome, detail
        FROM audit_log
        WHERE (%(before)s::bigint IS NULL OR id < %(before)s) AND (%(action)s::text IS NULL OR action = %(action)s)
        ORDER BY id DESC
        LIMIT %(limit)s
        """,
        {"before": before_id, "action": action, "limit": limit + 1},
    ).mappings().all()
    return keyset_page(rows, limit)
