"""Limits that refuse a request before it costs anything: failed authentication per source
address, heartbeats per device. Per worker, in memory, bounded; no database round trip.

Both answer 429 with Retry-After. They are per worker process: a device or source spread over
several workers is limited in each (a device keeps its connection, so its heartbeats usually
reach one worker; at most WEB_CONCURRENCY times the limit otherwise).

A refusal is held for LIMIT_REFUSAL_DELAY_S (1 s) before it is sent (``hold_refusal``): HTTP/1.1
answers one request at a time per connection, so a client flooding over a few keep-alive
connections is slowed to a few requests a second and costs the worker almost nothing, where
answering 429 at once would still cost a full request's CPU (~0.3 ms) 2,000 times a second.
Waiting costs a greenlet, not a core; connections stay bounded by HTTP_MAX_CONNECTIONS.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from api.concurrency import gevent_active
from api.errors import ApiError


def hold_refusal(delay_s: float) -> None:
    """Wait ``delay_s`` before a 429 is answered (under gevent only: a thread would be held)."""
    if delay_s > 0 and gevent_active():
        import gevent

        gevent.sleep(delay_s)


class FailureThrottle:
    """After ``limit`` failed authentications from one source within ``window_s``, every request
    from it is refused (429) until the window ends. At most ``max_sources`` sources are tracked
    (the least recently failing are forgotten), so a flood from many addresses stays bounded."""

    def __init__(self, limit: int, window_s: float, max_sources: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_sources = max_sources
        self._clock = clock
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()  # source -> (window start, count)
        self.refused = 0

    def check(self, source: str) -> None:
        """Raise 429 (Retry-After: the rest of the window) while ``source`` is over its limit."""
        entry = self._failures.get(source)
        if entry is None or entry[1] < self.limit or self.limit <= 0:
            return
        remaining = entry[0] + self.window_s - self._clock()
        if remaining <= 0:
            del self._failures[source]
            return
        self.refused += 1
        raise ApiError(429, "too_many_failures",
                       f"too many failed authentications from {source}; retry after {math.ceil(remaining)} s",
                       {"Retry-After": str(math.ceil(remaining))})

    def failed(self, source: str) -> None:
        """Count one failed authentication from ``source``."""
        now = self._clock()
        start, count = self._failures.pop(source, (now, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        self._failures[source] = (start, count + 1)  # most recent last
        while len(self._failures) > self.max_sources:
            self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)


class DeviceRateLimit:
    """At most ``per_minute`` heartbeats a minute from one device, with bursts of as many
    (a generic cell rate algorithm: one float per device that sent within the last burst).
    Devices idle for longer are pruned, so memory follows the devices active right now."""

    PRUNE_EVERY_S = 10.0

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._interval_s = 60.0 / per_minute if per_minute > 0 else 0.0
        self._tolerance_s = self._interval_s * (per_minute - 1)
        self._clock = clock
        self._tat: dict[int, float] = {}  # device -> theoretical arrival time of its next heartbeat
        self._pruned = clock()
        self.refused = 0

    def admit(self, device_id: int) -> None:
        """Count one heartbeat of ``device_id``; 429 with Retry-After when it is over the limit."""
        if self.per_minute <= 0:
            return
        now = self._clock()
        tat = max(self._tat.get(device_id, now), now)
        if tat - now > self._tolerance_s:
            self.refused += 1
            retry_s = max(1, math.ceil(tat - now - self._tolerance_s))
            raise ApiError(429, "rate_limited",
                           f"more than {self.per_minute} heartbeats a minute from this device; "
                           f"retry after {retry_s} s", {"Retry-After": str(retry_s)})
        self._tat[device_id] = tat + self._interval_s
        if now - self._pruned >= self.PRUNE_EVERY_S:
            self._prune(now)

    def _prune(self, now: float) -> None:
        self._pruned = now
        for device_id in [d for d, tat in self._tat.items() if tat <= now]:
            del self._tat[device_id]

    def __len__(self) -> int:
        return len(self._tat)
