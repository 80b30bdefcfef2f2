"""Admission control by the queueing delay of admitted work: CoDel to tell a standing queue,
then a limit on heartbeats in flight sized by Little's law.

Detecting overload (CoDel: Nichols and Jacobson, "Controlling Queue Delay", 2012). A burst drains
within an interval, so some heartbeat in it waited little; when even the least-delayed one
waited longer than the target for a whole interval, the queue is standing. The sojourn is each
admitted heartbeat's time in the server, from the arrival of its first bytes (the kernel's
timestamp: a request kept waiting while the event loop was busy counts) to its acknowledgement.
An interval in which no heartbeat was answered is judged by the writer's probe instead: the
worse of how late the worker's event loop runs and how long the oldest heartbeat still queued
for the writer has waited (a database that stopped answering, a starved loop). The probe alone
would not do: a heartbeat goes through the loop several times (read, write, wake-up, answer),
so its time in the server is a multiple of the loop's lateness.

A queue from a CPU taken by other work. When another program takes the cores (a test suite, a
backup, a noisy neighbour), the worker waits to run and its heartbeats wait with it, though it
has room for what arrives: refusing then helps little (a refusal costs nearly an acknowledgement)
and every refused heartbeat comes back seconds later. So in an interval in which the worker
waited for a CPU for more than STARVED_SHARE of it (the kernel's run delay, /proc's schedstat),
the standing queue must exceed STARVED_TARGET_FACTOR times the target to count as overload; a
longer wait still sheds, since the CPU left may be too little for what arrives.

What is refused while overloaded. Not a random share of new heartbeats (that refuses as many
when the worker has room as when it has none, and leaves it idle while the refused are away),
but only those that would wait: a new heartbeat is admitted while fewer than ``limit`` admitted
ones are in flight in this worker. By Little's law, in-flight = throughput x time in the server,
so the limit is the acknowledgements per second (measured each interval, smoothed) times the
target: what the worker sustains, waiting about the target. It tracks the worker's capacity as
the CPU it gets or the database's pace changes; a database that stops answering takes it to its
floor. Refusing only the excess keeps the worker busy (work-conserving), and the admitted ones
wait about the target. The overload ends after a second in which the admitted heartbeats stayed
under the target and fewer than half the limit were in flight (what arrives fits again).

Retry-After. A refusal costs the worker nearly what an acknowledgement costs (gunicorn's parsing
and answering are most of both), so refusals must stay a small share of what arrives, or they
eat the goodput. Devices honour Retry-After, so how long they are told to wait decides how often
the refused ones come back. Once a second, while the refused share is above twice
REFUSAL_BUDGET, Retry-After grows by that share over the budget (2x to 4x, from 1 s up to the
configured maximum); while it is under half of it, it shrinks by a tenth. How long is long
enough depends on the fleet (the more devices, the more come back each second), which the
server does not know; this finds it. It shrinks slowly: devices told to wait long are still
away, and giving the next ones a short wait would bring them all back together. Each refusal
names a whole number of seconds drawn evenly from 1 to that Retry-After: the refused come back
spread out, some soon, so the worker is not left idle while all of them wait out the same long
delay (the devices' own jitter alone still leaves a gap of half of it).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

LIMIT_FLOOR = 8  # heartbeats in flight admitted while overloaded, however slow the worker is now
EXIT_INTERVALS = 5  # intervals under the target with the limit far from reached that end an overload
RATE_SMOOTHING = 0.5  # weight of the last interval in the acknowledgement rate
REFUSAL_BUDGET = 0.05  # the refused share the Retry-After aims for
RETRY_AFTER_GROWTH_MAX = 4.0  # its largest factor in one second
RETRY_AFTER_DECAY = 0.9  # its factor once a second while under half the budget
STARVED_SHARE = 0.25  # of an interval spent waiting for a CPU: the queue is the machine's, not ours
STARVED_TARGET_FACTOR = 4.0  # the target is this many times longer in such an interval


def run_delay_s() -> float | None:
    """Seconds this thread has waited, runnable, for a CPU since it started (the kernel's run
    delay: the second field of /proc/thread-self/schedstat); None where the kernel keeps none."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


class CoDelShedder:
    """Admission of new heartbeats (see the module docstring). Pure: the caller feeds samples,
    times (monotonic seconds) and the number in flight."""

    __slots__ = ("target_s", "interval_s", "limit_max", "limit", "overloaded", "intervals_above", "last_min_s",
                 "rate_per_s", "refused_share", "retry_after_max_s", "retry_after", "_window_min", "_probe_min",
                 "_window_start", "_window_end", "_acks", "_peak", "_quiet", "_second_end", "_admitted",
                 "_refused", "_random", "_run_delay", "_delay_at_start", "starved_share")

    def __init__(self, target_s: float, interval_s: float, retry_after_max_s: float = 60.0,
                 limit_max: int = 5_000, rng: Callable[[], float] = random.random,
                 run_delay: Callable[[], float | None] | None = None) -> None:
        self.target_s = target_s
        self.interval_s = interval_s
        self.limit_max = limit_max
        self.limit = limit_max  # heartbeats in flight admitted (the limit binds only while overloaded)
        self.overloaded = False
        self.intervals_above = 0  # consecutive intervals whose minimum exceeded the target
        self.last_min_s = 0.0  # the minimum sojourn of the last closed interval
        self.rate_per_s = 0.0  # acknowledgements per second, smoothed over intervals
        self.refused_share = 0.0  # of the admission decisions in the last second
        self.retry_after_max_s = retry_after_max_s
        self.retry_after = 1.0  # seconds (see the module docstring)
        self._window_min = math.inf  # of the admitted heartbeats answered in this interval
        self._probe_min = math.inf  # of the probe's samples in this interval
        self._window_start: float | None = None
        self._window_end = math.inf
        self._acks = 0  # answered in this interval
        self._peak = 0  # most in flight at an admission decision in this interval
        self._quiet = 0  # consecutive intervals that would end the overload
        self._second_end: float | None = None
        self._admitted = 0  # in this second
        self._refused = 0
        self._random = rng
        # seconds waited for a CPU so far (run_delay_s); not called again once it answers None
        self._run_delay = run_delay
        self._delay_at_start = 0.0
        self.starved_share = 0.0  # of the last closed interval spent waiting for a CPU

    def observe(self, sojourn_s: float, now: float) -> None:
        """An admitted heartbeat was answered at ``now``, ``sojourn_s`` after it arrived."""
        self._tick(now)
        self._acks += 1
        if sojourn_s < self._window_min:
            self._window_min = sojourn_s

    def observe_probe(self, sojourn_s: float, now: float) -> None:
        """A probe's sample (see the module docstring), counted only in an interval in which no
        heartbeat was answered."""
        self._tick(now)
        if sojourn_s < self._probe_min:
            self._probe_min = sojourn_s

    def admit(self, in_flight: int) -> bool:
        """Whether to take one more heartbeat now, ``in_flight`` admitted ones being unanswered
        (False: refuse it with 503 + Retry-After)."""
        if in_flight > self._peak:
            self._peak = in_flight
        if in_flight < self.limit:
            self._admitted += 1
            return True
        self._refused += 1
        return False

    @property
    def retry_after_s(self) -> int:
        """The Retry-After of one refusal: whole seconds, drawn evenly from 1 to the current
        Retry-After (see the module docstring)."""
        return 1 + int(self._random() * round(self.retry_after))

    def _tick(self, now: float) -> None:
        if self._window_start is None:
            self._window_start, self._window_end = now, now + self.interval_s
            self._second_end = now + 1.0
            self._delay_at_start = self._read_run_delay()
        elif now >= self._window_end and (self._window_min != math.inf or self._probe_min != math.inf):
            # (an interval without a sample is judged by the next one: a probe starved of the
            # CPU for a whole interval reports how late it ran when it finally runs)
            self._close_interval(now)

    def _read_run_delay(self) -> float:
        delay = self._run_delay() if self._run_delay is not None else None
        if delay is None:  # not known here: every interval counts as not starved
            self._run_delay = None
            return 0.0
        return delay

    def _close_interval(self, now: float) -> None:
        elapsed = max(now - self._window_start, 1e-6)
        self.rate_per_s += RATE_SMOOTHING * (self._acks / elapsed - self.rate_per_s)
        low = self._window_min if self._window_min != math.inf else self._probe_min
        self.last_min_s = low
        delay = self._read_run_delay()
        self.starved_share = (delay - self._delay_at_start) / elapsed
        self._delay_at_start = delay
        target = self.target_s * (STARVED_TARGET_FACTOR if self.starved_share > STARVED_SHARE else 1.0)
        if low > target:
            self.intervals_above += 1
            self.overloaded = True
            self._quiet = 0
        else:
            self.intervals_above = 0
            # (waiting between the target and a starved interval's longer one neither starts nor
            # ends an overload)
            quiet = low <= self.target_s and self._peak < self.limit / 2
            self._quiet = self._quiet + 1 if quiet else 0
            if self._quiet >= EXIT_INTERVALS:
                self.overloaded = False
        if self.overloaded:
            self.limit = max(LIMIT_FLOOR, min(self.limit_max, int(self.rate_per_s * self.target_s)))
        else:
            self.limit = self.limit_max
        self._window_min = self._probe_min = math.inf
        self._acks = self._peak = 0
        self._window_start, self._window_end = now, now + self.interval_s
        if now >= self._second_end:
            self._close_second(now)

    def _close_second(self, now: float) -> None:
        decided = self._admitted + self._refused
        self.refused_share = self._refused / decided if decided else 0.0
        if self.refused_share > 2 * REFUSAL_BUDGET:
            growth = min(RETRY_AFTER_GROWTH_MAX, max(2.0, self.refused_share / REFUSAL_BUDGET))
            self.retry_after = min(self.retry_after_max_s, self.retry_after * growth)
        elif self.refused_share < REFUSAL_BUDGET / 2:
            self.retry_after = max(1.0, self.retry_after * RETRY_AFTER_DECAY)
        self._admitted = self._refused = 0
        self._second_end = now + 1.0
