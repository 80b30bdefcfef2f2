"""A small, bounded load driver for the fault tests (gevent + geventhttpclient, 127.0.0.1 only).

It sends heartbeats for enrolled devices, honours Retry-After with jitter, retries what was not
acknowledged (a retry lands in the same dedup bucket), and records every acknowledged
(device_id, bucket_ts) so that a test can check the database afterwards: nothing acknowledged
lost, no duplicate rows. Every run ends by its deadline.

Why a second load generator beside the simulator (the only other one): the drills assert on
each attempt (when it started, how long it took, its status, whether a 503 carried Retry-After)
within time windows around a fault, calibrate the sustainable rate closed-loop with 1,000
concurrent senders, and plan bucket-aligned bodies (anchor + k x 10 s) to compare acknowledgements
with the table row by row. The simulator is an open-loop fleet model that keeps bounded
histograms (for 100,000-device runs) and checks loss through the API; giving it a per-attempt
log and a closed loop would make it two tools in one.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import gevent
import psutil
from gevent.event import Event
from gevent.pool import Pool
from geventhttpclient import HTTPClient
from sqlalchemy import Engine, text

BUCKET_S = 10


@dataclass(frozen=True)
class Device:
    id: int
    token: str


@dataclass
class LoadResult:
    """What a run did. Times are seconds since the run's start (``t0``, time.monotonic())."""

    t0: float
    duration_s: float
    sent: int = 0
    acked: set[tuple[int, datetime]] = field(default_factory=set)
    ack_count: int = 0
    ack_times: list[float] = field(default_factory=list)
    # (start, latency, status, Retry-After in seconds or 0.0); status 0 = connection error or timeout
    attempts: list[tuple[float, float, int, float]] = field(default_factory=list)
    unacked: int = 0  # items still unacknowledged when the run had to stop
    wrong_device: int = 0  # acks naming another device than the token's (must stay 0)
    late_s: float = 0.0  # open loop: how far the driver fell behind its schedule
    created: int = 0  # open loop: new heartbeats created (each sent once or more until acknowledged)
    cpu_s: float = 0.0  # this process's CPU time (user + system) during the run: the driver's own cost

    def statuses(self, since: float = 0.0, until: float = float("inf")) -> dict[int, int]:
        """Count of answers per status between two times."""
        counts: dict[int, int] = {}
        for start, _, status, _ in self.attempts:
            if since <= start < until:
                counts[status] = counts.get(status, 0) + 1
        return counts

    def first_ack_after(self, t: float) -> float | None:
        """Run time of the first acknowledgement completed after ``t``."""
        later = [a for a in self.ack_times if a >= t]
        return min(later) if later else None

    def latency_pct(self, pct: float, status: int | None = None) -> float:
        """A latency percentile (seconds) of the answers, optionally of one status only."""
        values = sorted(lat for _, lat, st, _ in self.attempts if status is None or st == status)
        if not values:
            return 0.0
        return values[min(len(values) - 1, int(len(values) * pct / 100))]

    def missing_retry_after(self) -> int:
        """503 answers without a Retry-After header (must stay 0)."""
        return sum(1 for _, _, st, ra in self.attempts if st == 503 and not ra)


def _client(url: str, concurrency: int, timeout_s: float) -> HTTPClient:
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1", "the load driver targets 127.0.0.1 only"
    return HTTPClient(
        parts.hostname, parts.port, concurrency=concurrency,
        connection_timeout=timeout_s, network_timeout=timeout_s,
    )


class LoadDriver:
    """Closed loop (``concurrency`` senders) or open loop (``rate_per_s``), bounded in time."""

    def __init__(
        self, url: str, devices: list[Device], *, duration_s: float, concurrency: int = 64,
        rate_per_s: float | None = None, max_in_flight: int = 2000, drain_s: float = 15.0,
        timeout_s: float = 10.0, skip_rounds: int = 0, device_backoff: bool = False,
    ) -> None:
        self.url = url
        self.devices = devices
        self.duration_s = duration_s
        self.concurrency = concurrency
        self.rate_per_s = rate_per_s
        self.max_in_flight = max_in_flight
        self.drain_s = drain_s
        self.timeout_s = timeout_s
        self.device_backoff = device_backoff
        self.wall0 = datetime.now(UTC)
        # Each device's k-th heartbeat is stamped anchor + k*10 s + 5 s: distinct buckets,
        # within the server's clock-skew window for about a minute of load.
        epoch_s = int(self.wall0.timestamp()) - 240
        self.anchor = datetime.fromtimestamp(epoch_s - epoch_s % BUCKET_S, UTC)
        self.t0 = time.monotonic()
        self.result = LoadResult(self.t0, duration_s)
        self._next = skip_rounds * len(devices)  # rounds already sent by an earlier driver
        if rate_per_s is None:
            connections = concurrency
        else:
            connections = len(devices) if device_backoff else max_in_flight
        self._http = _client(url, connections, timeout_s)

    def now(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.t0

    def _item(self) -> tuple[Device, bytes]:
        j = self._next
        self._next += 1
        return self.devices[j % len(self.devices)], self._body(j)

    def _body(self, j: int) -> bytes:
        """The j-th heartbeat's body (device j mod n, its round j div n)."""
        sent_at = self.anchor + timedelta(seconds=(j // len(self.devices)) * BUCKET_S + 5)
        return json.dumps({
            "sent_at": sent_at.isoformat(), "battery_pct": 50 + j % 50, "charging": j % 2 == 0,
            "network_type": "wifi", "signal_dbm": -70, "app_version": "2.0.0", "os_version": "14",
            "uptime_s": j, "free_storage_mb": 1024,
        }).encode()

    def _attempt(self, device: Device, body: bytes) -> tuple[int, str | None]:
        """Send one heartbeat once and record the attempt: (status, Retry-After); status 0 is a
        connection error or timeout."""
        headers = {"Authorization": f"Bearer {device.token}", "Content-Type": "application/json"}
        r = self.result
        start = self.now()
        status, retry_after, payload = 0, None, b""
        try:
            resp = self._http.request("POST", "/v1/heartbeat", body=body, headers=headers)
            status = resp.status_code
            retry_after = resp.get("retry-after")
            payload = resp.read()
        except Exception:  # connection refused/reset, timeout: not acknowledged
            status = 0
        end = self.now()
        r.sent += 1
        r.attempts.append((start, end - start, status, float(retry_after) if retry_after else 0.0))
        if status == 200:
            ack = json.loads(payload)
            if ack["device_id"] != device.id:
                r.wrong_device += 1
            r.acked.add((ack["device_id"], datetime.fromisoformat(ack["bucket_ts"])))
            r.ack_count += 1
            r.ack_times.append(end)
        return status, retry_after

    @staticmethod
    def _retry_delay(status: int, retry_after: str | None) -> float:
        """How long to wait before sending again: Retry-After (with jitter) when the server gave
        one, a short pause otherwise."""
        if status == 503 and retry_after:
            return float(retry_after) * random.uniform(0.5, 1.5)
        return random.uniform(0.1, 0.3)

    def _send_until_acked(self, device: Device, body: bytes) -> None:
        stop_at = self.duration_s + self.drain_s
        while True:
            status, retry_after = self._attempt(device, body)
            if status == 200 or 400 <= status < 500:
                return  # a client error is a bug here; the test asserts there are none
            delay = self._retry_delay(status, retry_after)
            if self.now() + delay > stop_at:
                self.result.unacked += 1
                return
            gevent.sleep(delay)

    def _device(self, device: Device, pending: deque[int], wake: Event) -> None:
        """One device honouring Retry-After as a device does: its heartbeats go out one at a
        time, oldest first; after a refusal it sends nothing (new heartbeats wait on the device)
        until the Retry-After has passed, then goes on with the one refused."""
        stop_at = self.duration_s + self.drain_s
        while True:
            if not pending:
                if self.now() >= self.duration_s:
                    return
                wake.clear()
                wake.wait()
                continue
            status, retry_after = self._attempt(device, self._body(pending[0]))
            if status == 200 or 400 <= status < 500:
                pending.popleft()
                continue
            delay = self._retry_delay(status, retry_after)
            if self.now() + delay > stop_at:
                self.result.unacked += len(pending)
                return
            gevent.sleep(delay)

    def _closed_loop_sender(self) -> None:
        while self.now() < self.duration_s:
            self._send_until_acked(*self._item())

    def run(self) -> LoadResult:
        """Send load until ``duration_s``, then let retries finish (at most ``drain_s``)."""
        cpu0 = _cpu_s()
        if self.rate_per_s is None:
            gevent.joinall([gevent.spawn(self._closed_loop_sender) for _ in range(self.concurrency)])
        elif self.device_backoff:
            self._run_devices()
        else:
            pool = Pool(self.max_in_flight)
            i = 0
            while True:
                due = i / self.rate_per_s
                if due >= self.duration_s:
                    break
                wait = due - self.now()
                if wait > 0:
                    gevent.sleep(wait)
                else:
                    self.result.late_s = max(self.result.late_s, -wait)
                pool.spawn(self._send_until_acked, *self._item())
                i += 1
                self.result.created = i
            pool.join()
        self._http.close()
        self.result.cpu_s = _cpu_s() - cpu0
        return self.result

    def _run_devices(self) -> None:
        """Open loop over devices: new heartbeats are created at ``rate_per_s`` whatever the
        answers (each on its device, in turn), every millisecond's worth at once; each device
        sends its own (``_device``)."""
        assert self.rate_per_s is not None
        n = len(self.devices)
        pending: list[deque[int]] = [deque() for _ in range(n)]
        wakes = [Event() for _ in range(n)]
        senders = [gevent.spawn(self._device, self.devices[k], pending[k], wakes[k]) for k in range(n)]
        total = int(self.rate_per_s * self.duration_s)
        created = 0
        while created < total:
            due = min(total, int(self.now() * self.rate_per_s) + 1)
            for _ in range(due - created):
                j = self._next
                self._next += 1
                k = j % n
                pending[k].append(j)
                wakes[k].set()
            created = due
            self.result.created = created
            gevent.sleep(0.001)
        for wake in wakes:  # the run is over: an idle device ends
            wake.set()
        gevent.joinall(senders)


def _cpu_s() -> float:
    """This process's CPU time so far (user + system, seconds)."""
    t = psutil.Process().cpu_times()
    return t.user + t.system


def verify_against_db(engine: Engine, result: LoadResult) -> dict[str, int]:
    """Compare the acknowledgements with the heartbeats table: lost (acked but absent) and
    duplicate (device, bucket) rows. Also checks device_last_status holds the row that arrived last."""
    device_ids = sorted({d for d, _ in result.acked})
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT device_id, bucket_ts FROM heartbeats WHERE device_id = ANY(:ids)"),
            {"ids": device_ids},
        ).all()
        # The status row follows the heartbeat that arrived last (server receive time), not the
        # newest bucket: a retry of an older bucket stored after a newer one is the latest news.
        stale_last_status = conn.execute(text(
            "SELECT count(*) FROM (SELECT DISTINCT ON (device_id) device_id, bucket_ts AS b, received_at AS r "
            "FROM heartbeats ORDER BY device_id, received_at DESC, bucket_ts DESC) h "
            "LEFT JOIN device_last_status s USING (device_id) "
            "WHERE s.received_at IS DISTINCT FROM h.r"
        )).scalar_one()
    stored = [(d, b.astimezone(UTC)) for d, b in rows]
    stored_set = set(stored)
    return {
        "rows": len(stored),
        "lost": len(result.acked - stored_set),
        "duplicates": len(stored) - len(stored_set),
        "stale_last_status": stale_last_status,
    }
