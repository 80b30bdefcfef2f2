"""Admission control by the queueing delay of admitted work, CoDel-style.

CoDel (Nichols and Jacobson, "Controlling Queue Delay", 2012) tells a burst from a standing
queue by the *minimum* sojourn time over an interval: a burst drains within the interval, so
some item in it waited little; when even the least-delayed item waited longer than the target
for a whole interval, the queue is standing and only refusing work shrinks it.

The sojourn is each admitted heartbeat's time in the server, from the arrival of its first
bytes (the kernel's timestamp: a request kept waiting while the event loop was busy counts)
to its acknowledgement. An interval in which no heartbeat was answered is judged by the writer's probe
instead: the worse of how late the worker's event loop runs and how long the oldest heartbeat
still queued for the writer has waited (a database that stopped answering, a starved loop).
The probe alone would not do: a heartbeat goes through the loop several times (read, write,
wake-up, answer), so its time in the server is a multiple of the loop's lateness.

At the end of each interval whose minimum exceeded the target, the share of new heartbeats
refused (503 + Retry-After, before any work) rises by one or two steps (by how far above the
target); each interval under the target takes half a step off, so it is 0 again within 19
intervals (4 s at the defaults) of the queue draining. The share never reaches 1: under a
retry storm the refusals alone can keep the loop late, and refusing everything would then never
admit anything again.

Retry-After: a refusal costs the worker nearly what an acknowledgement costs (gunicorn's
parsing and answering are most of both), so refusals must stay a small share of what arrives,
or they eat the goodput (at twice the sustainable rate, refusing every second request would
leave next to nothing for the admitted). Devices honour Retry-After, so how long they are told
to wait decides how often the refused ones come back: once a second, while the refused share
stays above twice REFUSAL_BUDGET the Retry-After doubles (from 1 s, up to the configured
maximum), and while it is under half of it, it shrinks by a tenth. How long is long enough
depends on the fleet (the more devices, the more come back each second), which the server
does not know; this finds it. It shrinks slowly: devices told to wait long are still away, and
giving the next ones a short wait would bring them all back together.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

SHED_STEP = 0.1  # added to the refused share per interval above the target (1-2 steps), half off per one under
SHED_MAX = 0.95
REFUSAL_BUDGET = 0.05  # the refused share the Retry-After aims for
RETRY_AFTER_GROWTH = 2.0  # its factor once a second while the refused share is above twice the budget
RETRY_AFTER_DECAY = 0.9  # ... and while it is under half of it


class CoDelShedder:
    """The refused share of new heartbeats, steered by the interval-minimum sojourn time.
    Pure: the caller feeds samples and times (monotonic seconds)."""

    __slots__ = ("target_s", "interval_s", "shed_fraction", "intervals_above", "_window_min", "_probe_min",
                 "_window_end", "_random", "last_min_s", "retry_after_max_s", "retry_after", "_retry_adjust_at")

    def __init__(self, target_s: float, interval_s: float, rng: Callable[[], float] = random.random,
                 retry_after_max_s: float = 60.0) -> None:
        self.target_s = target_s
        self.interval_s = interval_s
        self.retry_after_max_s = retry_after_max_s
        self.retry_after = 1.0  # seconds (see the module docstring)
        self._retry_adjust_at: float | None = None
        self.shed_fraction = 0.0
        self.intervals_above = 0  # consecutive intervals whose minimum exceeded the target
        self.last_min_s = 0.0  # the minimum sojourn of the last closed interval
        self._window_min = math.inf  # of the admitted heartbeats answered in this interval
        self._probe_min = math.inf  # of the probe's samples in this interval
        self._window_end: float | None = None
        self._random = rng

    def observe(self, sojourn_s: float, now: float) -> None:
        """An admitted heartbeat was answered at ``now``, ``sojourn_s`` after it arrived."""
        self._tick(now)
        if sojourn_s < self._window_min:
            self._window_min = sojourn_s

    def observe_probe(self, sojourn_s: float, now: float) -> None:
        """A probe's sample (see the module docstring), counted only in an interval in which no
        heartbeat was answered."""
        self._tick(now)
        if sojourn_s < self._probe_min:
            self._probe_min = sojourn_s

    def _tick(self, now: float) -> None:
        if self._window_end is None:
            self._window_end = now + self.interval_s
        elif now >= self._window_end and (self._window_min != math.inf or self._probe_min != math.inf):
            # (an interval without a sample is judged by the next one: a probe starved of the
            # CPU for a whole interval reports how late it ran when it finally runs)
            self._close_interval(now)

    def _close_interval(self, now: float) -> None:
        low = self._window_min if self._window_min != math.inf else self._probe_min
        self.last_min_s = low
        if low > self.target_s:
            self.intervals_above += 1
            # how far above the target decides how fast the share rises (1 to 2 steps)
            self.shed_fraction = min(SHED_MAX, self.shed_fraction + SHED_STEP * min(2.0, low / self.target_s))
        else:
            self.intervals_above = 0
            self.shed_fraction = max(0.0, round(self.shed_fraction - SHED_STEP / 2, 6))
        self._window_min = self._probe_min = math.inf
        self._window_end = now + self.interval_s
        if self._retry_adjust_at is None or now >= self._retry_adjust_at:
            self._retry_adjust_at = now + 1.0
            if self.shed_fraction > 2 * REFUSAL_BUDGET:
                self.retry_after = min(self.retry_after_max_s, self.retry_after * RETRY_AFTER_GROWTH)
            elif self.shed_fraction < REFUSAL_BUDGET / 2:
                self.retry_after = max(1.0, self.retry_after * RETRY_AFTER_DECAY)

    def admit(self) -> bool:
        """Whether to take one more heartbeat now (False: refuse it with 503)."""
        return not self.shed_fraction or self._random() >= self.shed_fraction

    @property
    def retry_after_s(self) -> int:
        """The Retry-After of a refusal, whole seconds (see the module docstring)."""
        return round(self.retry_after)
