"""Webhook deliveries: batch the new events, sign them, POST them, retry with backoff for a day.

Off the device path: a dispatcher pass runs in the scheduler (every WEBHOOK_POLL_INTERVAL_S),
never in a heartbeat request, and holds at most WEBHOOK_MAX_IN_FLIGHT deliveries in memory at
once — everything else waits in PostgreSQL (webhook_deliveries), so a slow or dead receiver
costs a few idle connections of the scheduler and nothing else, and nothing is lost.

What a receiver gets (one POST per batch of up to WEBHOOK_BATCH_MAX events):
- body ``{"webhook_id", "idempotency_key", "events": [{id, type, device_id, occurred_at, detail}]}``,
  events in the order they happened (a webhook's deliveries go out one at a time, oldest first);
- ``X-NexMDM-Timestamp``: Unix seconds of this attempt; ``X-NexMDM-Signature``:
  ``v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`` (verify it, and reject old timestamps);
- ``Idempotency-Key``: the same on every attempt of a batch. Delivery is at least once: a receiver
  that answered too late gets the batch again and recognises it by this key.
Any 2xx is success. Otherwise the batch is retried after 1, 2, 4 … s (at most
WEBHOOK_BACKOFF_MAX_S apart) until WEBHOOK_RETRY_FOR_S (a day) after it was made, then given up
(status ``failed``) and the next batch goes.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import Engine

from config.settings import Settings
from db.webhooks import (
    Attempt,
    ClaimedWebhook,
    Delivery,
    active_webhook_ids,
    claim_webhooks,
    enqueue_deliveries,
    extend_lease,
    next_due_delivery,
    record_attempt,
    release_webhook,
)

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-NexMDM-Signature"
TIMESTAMP_HEADER = "X-NexMDM-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
USER_AGENT = "NexMDM-Webhooks/1"
MAX_DELIVERIES_PER_PASS = 1_000  # per webhook; the next pass goes on

Clock = Callable[[], datetime]


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value: ``v1=`` + hex HMAC-SHA256 of ``"<timestamp>." + body``."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def verify(secret: str, timestamp: str, signature: str, body: bytes, *, now_s: float,
           tolerance_s: float = 300.0) -> bool:
    """What a receiver does: the signature matches (constant time) and the timestamp is recent."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs(now_s - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """Wait before the next try after ``attempts`` failed ones: base, 2 base, 4 base … capped."""
    return min(max_s, base_s * 2 ** max(0, min(attempts - 1, 62)))


def next_attempt_at(created_at: datetime, attempts: int, failed_at: datetime, settings: Settings) -> datetime | None:
    """When to try again after the ``attempts``-th failure, or None to give up: the last try is
    made WEBHOOK_RETRY_FOR_S after the batch was made."""
    deadline = created_at + timedelta(seconds=settings.webhook_retry_for_s)
    if failed_at >= deadline:
        return None
    wait = backoff_s(attempts, settings.webhook_backoff_base_s, settings.webhook_backoff_max_s)
    return min(failed_at + timedelta(seconds=wait), deadline)


@dataclass(frozen=True)
class SendResult:
    """What the receiver answered (status) or why there was no answer (error)."""

    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


Sender = Callable[[str, bytes, dict[str, str], float], SendResult]


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> SendResult:
    """POST ``body`` to ``url`` (http or https), following no redirect; never raises."""
    parts = urlsplit(url)
    conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = conn_class(parts.hostname or "", parts.port, timeout=timeout_s)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(65_536)
        return SendResult(response.status, None if 200 <= response.status < 300 else f"HTTP {response.status}")
    except TimeoutError:
        return SendResult(None, f"timed out after {timeout_s:g} s")
    except (OSError, http.client.HTTPException) as exc:
        return SendResult(None, f"{type(exc).__name__}: {exc}"[:500])
    finally:
        conn.close()


@dataclass
class DispatchReport:
    """What one pass did."""

    enqueued: int = 0
    delivered: int = 0
    failed_attempts: int = 0
    given_up: int = 0


class WebhookDispatcher:
    """Batches new events into deliveries and sends the due ones. Any number may run at once
    (one per scheduler process): each webhook is leased to one of them at a time."""

    def __init__(self, engine: Engine, settings: Settings, *, clock: Clock | None = None,
                 sender: Sender = post, owner: str | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock or (lambda: datetime.now(UTC))
        self.sender = sender
        self.owner = owner or f"dispatcher-{uuid.uuid4().hex[:12]}"
        self.lease_s = max(60.0, settings.webhook_timeout_s * 3)

    def enqueue(self) -> int:
        """Make deliveries of the events recorded since each webhook's cursor."""
        with self.engine.begin() as conn:
            ids = active_webhook_ids(conn)
        made = 0
        for webhook_id in ids:
            with self.engine.begin() as conn:
                made += enqueue_deliveries(conn, webhook_id, batch_max=self.settings.webhook_batch_max,
                                           now=self.clock())
        return made

    def run_once(self) -> DispatchReport:
        """One pass: enqueue, then send every due delivery (webhooks in parallel, at most
        WEBHOOK_MAX_IN_FLIGHT at a time, each webhook's in order)."""
        report = DispatchReport(enqueued=self.enqueue())
        limit = self.settings.webhook_max_in_flight
        while True:
            with self.engine.begin() as conn:
                claimed = claim_webhooks(conn, owner=self.owner, now=self.clock(), lease_s=self.lease_s, limit=limit)
            if not claimed:
                return report
            with ThreadPoolExecutor(max_workers=len(claimed), thread_name_prefix="webhook") as pool:
                for part in pool.map(self._drain, claimed):
                    report.delivered += part.delivered
                    report.failed_attempts += part.failed_attempts
                    report.given_up += part.given_up
            if len(claimed) < limit:
                return report

    def _drain(self, hook: ClaimedWebhook) -> DispatchReport:
        report = DispatchReport()
        try:
            for _ in range(MAX_DELIVERIES_PER_PASS):
                with self.engine.begin() as conn:
                    delivery = next_due_delivery(conn, hook.id, self.clock())
                if delivery is None:
                    break
                status = self._send(hook, delivery)
                if status == "delivered":
                    report.delivered += 1
                elif status == "cancelled":
                    break  # the webhook was deleted meanwhile
                else:
                    report.failed_attempts += 1
                    report.given_up += status == "failed"
                    if status == "pending":
                        break  # the ones behind it wait for its backoff: per-device order
                with self.engine.begin() as conn:
                    if not extend_lease(conn, hook.id, self.owner, self.clock() + timedelta(seconds=self.lease_s)):
                        break
        except Exception:  # the database went away, say: the lease runs out, the next pass retries
            log.exception("webhook %d: dispatch failed", hook.id)
        finally:
            try:
                with self.engine.begin() as conn:
                    release_webhook(conn, hook.id, self.owner)
            except Exception:
                log.warning("webhook %d: lease not released (it expires by itself)", hook.id, exc_info=True)
        return report

    def _send(self, hook: ClaimedWebhook, delivery: Delivery) -> str:
        body = delivery.body.encode()
        timestamp = int(self.clock().timestamp())
        headers = {
            "Content-Type": "application/json", "User-Agent": USER_AGENT,
            TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(hook.secret, timestamp, body),
            IDEMPOTENCY_HEADER: delivery.idempotency_key, "X-NexMDM-Delivery": str(delivery.id),
            "X-NexMDM-Event-Count": str(delivery.event_count),
        }
        started = time.perf_counter()
        result = self.sender(hook.url, body, headers, self.settings.webhook_timeout_s)
        at = self.clock()
        attempt = Attempt(at, result.ok, result.status_code, result.error, (time.perf_counter() - started) * 1000)
        retry_at = None if result.ok else next_attempt_at(delivery.created_at, delivery.attempts + 1, at, self.settings)
        with self.engine.begin() as conn:
            status = record_attempt(conn, delivery.id, attempt, retry_at)
        if not result.ok:
            log.warning("webhook %d delivery %d attempt %d: %s; %s", hook.id, delivery.id, delivery.attempts + 1,
                        result.error, f"next try {retry_at:%H:%M:%S}Z" if retry_at else "given up")
        return status


def dispatch_webhooks(engine: Engine, settings: Settings) -> None:
    """What the scheduler calls every WEBHOOK_POLL_INTERVAL_S (by dotted path); never raises."""
    try:
        WebhookDispatcher(engine, settings, owner=f"pid{os.getpid()}-{_PROCESS_TAG}").run_once()
    except Exception:
        log.exception("webhook dispatch pass failed; the next pass retries")


_PROCESS_TAG = uuid.uuid4().hex[:12]
