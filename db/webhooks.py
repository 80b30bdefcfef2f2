"""Webhooks and their deliveries: registration, batching events into deliveries, claiming the
next delivery of a webhook, recording each attempt, and the delivery log.

A webhook's deliveries go out one at a time, oldest first (``webhook_deliveries.id`` order): a
delivery that fails holds the ones behind it back until it succeeds or is given up, so every
receiver sees each device's events in the order they happened. A dispatcher takes a webhook by
a lease (``lease_until``) instead of a lock held across the HTTP call, so no transaction stays
open while a receiver is slow, and a dispatcher that dies frees its webhooks when the lease ends.

Every function takes the connection first and never commits: the caller owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy import Connection

from db.errors import WebhookNotFound
from db.paging import keyset_page

_PUBLIC_FIELDS = "id, url, event_types, created_at, cursor_event_id"


def create_webhook(conn: Connection, url: str, event_types: list[str], secret: str) -> dict[str, Any]:
    """Register a webhook; it receives the events recorded from now on."""
    row = conn.exec_driver_sql(
        f"""
        INSERT INTO webhooks (url, event_types, secret, cursor_event_id)
        VALUES (%(url)s, %(types)s, %(secret)s, (SELECT COALESCE(max(id), 0) FROM events))
        RETURNING {_PUBLIC_FIELDS}
        """,
        {"url": url, "types": event_types, "secret": secret},
    ).one()
    return dict(row._mapping)


def list_webhooks(conn: Connection) -> list[dict[str, Any]]:
    """Active webhooks (secrets left out) with how many deliveries each has pending."""
    rows = conn.exec_driver_sql(
        f"""
        SELECT {", ".join("w." + f for f in _PUBLIC_FIELDS.split(", "))},
               (SELECT count(*) FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.status = 'pending')
                   AS pending_deliveries
        FROM webhooks w WHERE w.deleted_at IS NULL ORDER BY w.id
        """
    ).fetchall()
    return [dict(r._mapping) for r in rows]


def delete_webhook(conn: Connection, webhook_id: int) -> dict[str, Any]:
    """Stop a webhook: no more deliveries; pending ones are cancelled (the log stays). Raises
    WebhookNotFound when there is no active webhook of that id."""
    row = conn.exec_driver_sql(
        "UPDATE webhooks SET deleted_at = now() WHERE id = %(id)s AND deleted_at IS NULL RETURNING id, deleted_at",
        {"id": webhook_id},
    ).first()
    if row is None:
        raise WebhookNotFound(webhook_id)
    conn.exec_driver_sql(
        "UPDATE webhook_deliveries SET status = 'cancelled' WHERE webhook_id = %(id)s AND status = 'pending'",
        {"id": webhook_id},
    )
    return dict(row._mapping)


def enqueue_deliveries(conn: Connection, webhook_id: int, *, batch_max: int, now: datetime,
                       max_events: int = 50_000) -> int:
    """Turn the webhook's events recorded since its cursor into deliveries of up to
    ``batch_max`` events each (bodies built in PostgreSQL, one statement) and move the cursor.
    Returns how many deliveries were made. Caller commits."""
    row = conn.exec_driver_sql(
        """
        WITH hook AS (
            SELECT id, cursor_event_id, event_types FROM webhooks
            WHERE id = %(id)s AND deleted_at IS NULL FOR UPDATE
        ),
        scanned AS (
            SELECT e.id, e.type, e.device_id, e.occurred_at, e.detail,
                   cardinality(hook.event_types) = 0 OR e.type = ANY(hook.event_types) AS wanted
            FROM hook JOIN events e ON e.id > hook.cursor_event_id
            ORDER BY e.id
            LIMIT %(max_events)s
        ),
        numbered AS (
            SELECT s.*, (row_number() OVER (ORDER BY s.id) - 1) / %(batch)s AS batch_no
            FROM scanned s WHERE s.wanted
        ),
        batches AS (
            SELECT b.batch_no, gen_random_uuid() AS key FROM (SELECT DISTINCT batch_no FROM numbered) b
        ),
        made AS (
            INSERT INTO webhook_deliveries (webhook_id, idempotency_key, first_event_id, last_event_id,
                                            event_count, body, created_at, next_attempt_at)
            SELECT %(id)s, b.key, min(n.id), max(n.id), count(*),
                   json_build_object(
                       'webhook_id', %(id)s, 'idempotency_key', b.key,
                       'events', json_agg(json_build_object('id', n.id, 'type', n.type, 'device_id', n.device_id,
                                                            'occurred_at', n.occurred_at, 'detail', n.detail)
                                          ORDER BY n.id))::text,
                   %(now)s, %(now)s
            FROM numbered n JOIN batches b USING (batch_no)
            GROUP BY b.batch_no, b.key
            ORDER BY b.batch_no
            RETURNING id
        ),
        moved AS (
            UPDATE webhooks w SET cursor_event_id = (SELECT max(id) FROM scanned)
            FROM hook WHERE w.id = hook.id AND EXISTS (SELECT 1 FROM scanned)
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM made), (SELECT count(*) FROM moved)
        """,
        {"id": webhook_id, "batch": batch_max, "max_events": max_events, "now": now},
    ).one()
    return row[0]


@dataclass(frozen=True)
class ClaimedWebhook:
    """A webhook this dispatcher holds the lease of, with what it needs to sign and send."""

    id: int
    url: str
    secret: str


@dataclass(frozen=True)
class Delivery:
    """The next delivery of a webhook: its body is sent as is on every attempt."""

    id: int
    webhook_id: int
    idempotency_key: str
    body: str
    event_count: int
    attempts: int
    created_at: datetime


def active_webhook_ids(conn: Connection) -> list[int]:
    """Ids of the webhooks not deleted."""
    return [r[0] for r in conn.exec_driver_sql("SELECT id FROM webhooks WHERE deleted_at IS NULL ORDER BY id")]


def claim_webhooks(conn: Connection, *, owner: str, now: datetime, lease_s: float, limit: int) -> list[ClaimedWebhook]:
    """Lease up to ``limit`` webhooks whose oldest pending delivery is due and that nobody else
    holds (SKIP LOCKED: dispatchers never wait for each other). Caller commits at once."""
    rows = conn.exec_driver_sql(
        """
        WITH cand AS (
            SELECT w.id FROM webhooks w
            WHERE w.deleted_at IS NULL AND (w.lease_until IS NULL OR w.lease_until < %(now)s)
              AND (SELECT d.next_attempt_at FROM webhook_deliveries d
                   WHERE d.webhook_id = w.id AND d.status = 'pending' ORDER BY d.id LIMIT 1) <= %(now)s
            ORDER BY w.id
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        )
        UPDATE webhooks w SET lease_owner = %(owner)s, lease_until = %(until)s
        FROM cand WHERE w.id = cand.id
        RETURNING w.id, w.url, w.secret
        """,
        {"now": now, "limit": limit, "owner": owner, "until": now + timedelta(seconds=lease_s)},
    ).fetchall()
    return [ClaimedWebhook(*r) for r in rows]


def next_due_delivery(conn: Connection, webhook_id: int, now: datetime) -> Delivery | None:
    """The webhook's oldest pending delivery if it is due, else None (nothing pending, or the
    oldest one waits for its backoff: the ones behind it wait too)."""
    row = conn.exec_driver_sql(
        """
        SELECT id, webhook_id, idempotency_key::text, body, event_count, attempts, created_at, next_attempt_at
        FROM webhook_deliveries WHERE webhook_id = %(id)s AND status = 'pending' ORDER BY id LIMIT 1
        """,
        {"id": webhook_id},
    ).first()
    if row is None or row.next_attempt_at > now:
        return None
    return Delivery(row.id, row.webhook_id, row.idempotency_key, row.body, row.event_count, row.attempts,
                    row.created_at)


@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST of a delivery."""

    at: datetime
    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: float


def record_attempt(conn: Connection, delivery_id: int, attempt: Attempt, next_attempt_at: datetime | None) -> str:
    """Log an attempt and move the delivery on: delivered when it succeeded, pending until
    ``next_attempt_at`` when it failed, failed for good when that is None. Returns the status
    (``cancelled`` when the webhook was deleted while the attempt was on its way)."""
    status = "delivered" if attempt.ok else ("pending" if next_attempt_at is not None else "failed")
    entry = msgspec.json.encode({"at": attempt.at, "status_code": attempt.status_code, "error": attempt.error,
                                 "duration_ms": round(attempt.duration_ms, 1)}).decode()
    updated = conn.exec_driver_sql(
        """
        UPDATE webhook_deliveries
        SET attempts = attempts + 1, last_attempt_at = %(at)s, last_status_code = %(code)s, last_error = %(error)s,
            status = %(status)s, delivered_at = CASE WHEN %(ok)s THEN %(at)s END,
            next_attempt_at = COALESCE(%(next)s, next_attempt_at),
            attempt_log = attempt_log || jsonb_build_array(%(entry)s::jsonb)
        WHERE id = %(id)s AND status = 'pending'  -- a delivery cancelled meanwhile stays cancelled
        """,
        {"id": delivery_id, "at": attempt.at, "code": attempt.status_code, "error": attempt.error, "status": status,
         "ok": attempt.ok, "next": next_attempt_at, "entry": entry},
    ).rowcount
    return status if updated else "cancelled"


def extend_lease(conn: Connection, webhook_id: int, owner: str, until: datetime) -> bool:
    """Keep holding a webhook; False when the lease was lost (expired and taken by another)."""
    return conn.exec_driver_sql(
        "UPDATE webhooks SET lease_until = %(until)s WHERE id = %(id)s AND lease_owner = %(owner)s",
        {"id": webhook_id, "owner": owner, "until": until},
    ).rowcount == 1


def release_webhook(conn: Connection, webhook_id: int, owner: str) -> None:
    """Give a webhook's lease back (if this owner still holds it)."""
    conn.exec_driver_sql(
        "UPDATE webhooks SET lease_owner = NULL, lease_until = NULL WHERE id = %(id)s AND lease_owner = %(owner)s",
        {"id": webhook_id, "owner": owner},
    )


_DELIVERY_FIELDS = """id, webhook_id, idempotency_key::text AS idempotency_key, status, event_count, first_event_id,
    last_event_id, attempts, created_at, next_attempt_at, last_attempt_at, delivered_at, last_status_code,
    last_error, attempt_log"""


def list_deliveries(
    conn: Connection, webhook_id: int, *, status: str | None = None, before: int | None = None, limit: int = 100
) -> tuple[list[dict[str, Any]], int | None]:
    """The delivery log of a webhook, newest first (keyset on id). Raises WebhookNotFound, for a
    deleted webhook too: once deleted it is gone from the API (its rows stay for the prune)."""
    active = "SELECT 1 FROM webhooks WHERE id = %(id)s AND deleted_at IS NULL"
    if conn.exec_driver_sql(active, {"id": webhook_id}).first() is None:
        raise WebhookNotFound(webhook_id)
    rows = conn.exec_driver_sql(
        f"""
        SELECT {_DELIVERY_FIELDS} FROM webhook_deliveries
        WHERE webhook_id = %(id)s AND id < %(before)s AND (%(status)s::text IS NULL OR status = %(status)s)
        ORDER BY id DESC LIMIT %(limit)s
        """,
        {"id": webhook_id, "before": before if before is not None else 2**63 - 1, "status": status,
         "limit": limit + 1},
    ).fetchall()
    return keyset_page(rows, limit)


def prune_deliveries(conn: Connection, older_than: datetime) -> int:
    """Delete finished deliveries (delivered, failed, cancelled) created before ``older_than``."""
    return conn.exec_driver_sql(
        "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND created_at < %(t)s", {"t": older_than}
    ).rowcount
