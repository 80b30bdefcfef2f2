"""The audit trail of operator changes: one audit_log row per change, whatever its outcome.

``requires_role(..., audit="action")`` (api/auth.py) wraps a change in ``audit_after``; a view
that commits a change writes its row in the same transaction with ``audit_change``, so the
change and its record commit together. Refusals for the role, failures and changes that
commit elsewhere (job runs) are written after the fact in a transaction of their own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from flask import current_app, g
from sqlalchemy import Connection

from api.errors import ApiError
from db.audit import AuditRecord, record_audit
from db.engine import transaction

log = logging.getLogger(__name__)

_CHANGE = "nexmdm_audit_change"


class Actor(Protocol):
    """Who acts (api.auth.Principal)."""

    name: str
    role: str
    key_id: int | None


@dataclass
class _Change:
    action: str
    actor: Actor
    source_addr: str
    target: str | None
    written: bool = False


def _target(kwargs: dict[str, Any]) -> str | None:
    for name, value in kwargs.items():
        return f"{name.removesuffix('_id')}:{value}"
    return None


def _record(change: _Change, outcome: str, target: str | None, detail: dict[str, Any] | None) -> AuditRecord:
    actor = change.actor
    return AuditRecord(
        actor=actor.name, actor_role=actor.role, actor_key_id=actor.key_id, action=change.action,
        outcome=outcome, target=target, source_addr=change.source_addr, detail=detail,
    )


def audit_change(conn: Connection, *, target: str | None = None, detail: dict[str, Any] | None = None) -> None:
    """Write the current change's 'ok' row on ``conn``, in the change's own transaction."""
    change: _Change = g.get(_CHANGE)
    record_audit(conn, _record(change, "ok", target or change.target, detail))
    change.written = True


def _write_now(change: _Change, outcome: str, detail: dict[str, Any] | None) -> None:
    try:
        with transaction(current_app.extensions["nexmdm"].engine) as conn:
            record_audit(conn, _record(change, outcome, change.target, detail))
    except Exception:  # the answer stands; the log says what the trail missed
        log.exception("audit row not written: %s %s %s", change.action, outcome, change.target)


@contextlib.contextmanager
def audit_after(action: str, actor: Actor, source_addr: str, view_kwargs: dict[str, Any], needed: str
                ) -> Iterator[None]:
    """Around a change: make sure an audit row records its outcome if it raises."""
    change = _Change(action, actor, source_addr, _target(view_kwargs))
    g.setdefault(_CHANGE, change)
    try:
        yield
    except Exception as exc:
        if isinstance(exc, ApiError):
            outcome = "denied" if exc.code == "role_forbidden" else "failed"
            detail = {"error": exc.code, "status": exc.status, "needs": needed}
        else:
            outcome, detail = "failed", {"error": type(exc).__name__}
        if not change.written:
            _write_now(change, outcome, detail)
        raise


def audit_response(response: Any) -> Any:
    """After a change's view answered: write its row unless the view wrote it (ok) already."""
    change: _Change | None = g.get(_CHANGE)
    if change is None or change.written:
        return response
    status = response.status_code
    detail: dict[str, Any] = {"status": status}
    code = getattr(response, "error_code", "")
    if code:
        detail["error"] = code
    _write_now(change, "ok" if status < 400 else "failed", detail)
    return response
