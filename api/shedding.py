"""Admission control by the queueing delay of admitted work, CoDel-style.

CoDel (Nichols and Jacobson, "Controlling Queue Delay", 2012) tells a burst from a standing
queue by the *minimum* sojourn time over an interval: a burst drains within the interval, so
some item in it waited little; when even the least-delayed item waited longer than the target
for a whole interval, the queue is standing and only refusing work shrinks it.

Here the sojourn is sampled every few milliseconds as the worse of two waits an admitted
heartbeat goes through: how late the worker's event loop runs (a runnable greenlet waits that
long for the CPU) and how long the oldest heartbeat still queued for the writer has waited (the
database is not keeping up). At the end of each interval whose minimum sample exceeded the
target, the share of new heartbeats refused (503 + Retry-After, before any work) rises by one or
two steps (by how far above the target); each interval under the target takes half a step off,
so it is 0 again within 19 intervals (4 s at the defaults) of the queue draining. The share never reaches 1: under a
retry storm the refusals alone can keep the loop late, and refusing everything would then never
admit anything again.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

SHED_STEP = 0.1  # added to the refused share per interval above the target (1-2 steps), half off per one under
SHED_MAX = 0.95


class CoDelShedder:
    """The refused share of new heartbeats, steered by the interval-minimum sojourn time.
    Pure: the caller feeds samples and times (monotonic seconds)."""

    __slots__ = ("target_s", "interval_s", "shed_fraction", "intervals_above", "_window_min", "_window_end",
                 "_random", "last_min_s")

    def __init__(self, target_s: float, interval_s: float, rng: Callable[[], float] = random.random) -> None:
        self.target_s = target_s
        self.interval_s = interval_s
        self.shed_fraction = 0.0
        self.intervals_above = 0  # consecutive intervals whose minimum exceeded the target
        self.last_min_s = 0.0  # the minimum sojourn of the last closed interval
        self._window_min = math.inf
        self._window_end: float | None = None
        self._random = rng

    def observe(self, sojourn_s: float, now: float) -> None:
        """One sojourn sample taken at ``now``."""
        if self._window_end is None:
            self._window_end = now + self.interval_s
        elif now >= self._window_end and self._window_min != math.inf:
            # (an interval without a sample is judged by the next one: a probe starved of the
            # CPU for a whole interval reports how late it ran when it finally runs)
            self._close_interval(now)
        if sojourn_s < self._window_min:
            self._window_min = sojourn_s

    def _close_interval(self, now: float) -> None:
        low = self._window_min
        self.last_min_s = low
        if low > self.target_s:
            self.intervals_above += 1
            # how far above the target decides how fast the share rises (1 to 2 steps)
            self.shed_fraction = min(SHED_MAX, self.shed_fraction + SHED_STEP * min(2.0, low / self.target_s))
        else:
            self.intervals_above = 0
            self.shed_fraction = max(0.0, round(self.shed_fraction - SHED_STEP / 2, 6))
        self._window_min = math.inf
        self._window_end = now + self.interval_s

    def admit(self) -> bool:
        """Whether to take one more heartbeat now (False: refuse it with 503)."""
        return not self.shed_fraction or self._random() >= self.shed_fraction

    @property
    def retry_after_s(self) -> int:
        """The Retry-After of a refusal: the harder it sheds, the later devices come back (1-9 s);
        a retry storm of Retry-After: 1 would keep the loop busy with refusals alone."""
        return 1 + round(8 * self.shed_fraction)
