"""The admission control: a burst is tolerated; a standing queue makes it admit only as many
heartbeats in flight as the worker acknowledges within the target (Little's law); the overload
ends once what arrives fits again (samples, clock and in-flight counts fed by the test)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter

import pytest

from api.shedding import (
    EXIT_INTERVALS,
    LIMIT_FLOOR,
    STARVED_SHARE,
    STARVED_TARGET_FACTOR,
    CoDelShedder,
    run_delay_s,
)


def feed(shedder: CoDelShedder, samples_ms: list[float], start_s: float, step_s: float = 0.001,
         in_flight: int = 0) -> float:
    """One acknowledged heartbeat every ``step_s`` (1,000/s by default), each after an admission
    decision with ``in_flight`` unanswered; returns the time after the last."""
    now = start_s
    for ms in samples_ms:
        shedder.admit(in_flight)
        shedder.observe(ms / 1000, now)
        now += step_s
    return now


def test_a_burst_shorter_than_the_interval_refuses_nothing() -> None:
    shedder = CoDelShedder(target_s=0.02, interval_s=0.1)
    # 80 ms of 150 ms waits, then the queue drains: every interval has a sample under the target
    now = feed(shedder, [150] * 80 + [1] * 20, 0.0)
    now = feed(shedder, [150] * 80 + [1] * 20 + [1] * 100, now)
    assert not shedder.overloaded and shedder.limit == 5_000
    assert shedder.admit(4_999)


def test_a_standing_queue_limits_what_is_in_flight_to_what_is_acknowledged_within_the_target() -> None:
    shedder = CoDelShedder(target_s=0.05, interval_s=0.1)
    feed(shedder, [80] * 1_000, 0.0)  # 1 s at 1,000 acknowledgements/s, each 80 ms in the server
    assert shedder.overloaded and shedder.intervals_above >= 9
    # 1,000/s x 50 ms: 50 in flight wait about the target
    assert 45 <= shedder.limit <= 50, shedder.limit
    assert shedder.admit(shedder.limit - 1) and not shedder.admit(shedder.limit)


def test_the_limit_follows_the_rate_the_worker_acknowledges() -> None:
    shedder = CoDelShedder(target_s=0.05, interval_s=0.1)
    now = feed(shedder, [80] * 1_000, 0.0)
    fast = shedder.limit
    feed(shedder, [80] * 500, now, step_s=0.002)  # the worker gets half the CPU: 500/s
    assert abs(shedder.limit - fast / 2) <= 3, (fast, shedder.limit)


def test_a_database_that_stops_answering_takes_the_limit_to_its_floor() -> None:
    shedder = CoDelShedder(target_s=0.05, interval_s=0.1)
    now = feed(shedder, [10] * 500, 0.0)
    assert not shedder.overloaded
    for _ in range(100):  # 1 s: nothing answered, the probe finds the queue's head ageing
        shedder.observe_probe(0.3, now)
        now += 0.01
    assert shedder.overloaded and shedder.limit == LIMIT_FLOOR
    assert not shedder.admit(LIMIT_FLOOR)


def test_the_overload_ends_once_what_arrives_fits_and_not_before() -> None:
    shedder = CoDelShedder(target_s=0.05, interval_s=0.1)
    now = feed(shedder, [80] * 1_000, 0.0)
    limit = shedder.limit
    # Under the target, but only because the limit holds the queue: still overloaded
    now = feed(shedder, [30] * 1_000, now, in_flight=limit - 1)
    assert shedder.overloaded
    # Under the target with few in flight: over after EXIT_INTERVALS intervals
    now = feed(shedder, [5] * 100 * (EXIT_INTERVALS - 1), now, in_flight=2)
    assert shedder.overloaded
    feed(shedder, [5] * 200, now, in_flight=2)
    assert not shedder.overloaded and shedder.limit == 5_000


def test_intervals_the_probe_was_starved_through_are_judged_by_its_late_samples() -> None:
    shedder = CoDelShedder(target_s=0.02, interval_s=0.1)
    feed(shedder, [1] * 5, 0.0)  # a good start
    shedder.observe_probe(0.3, 0.35)  # the probe ran 300 ms late: no sample in between
    shedder.observe_probe(0.001, 0.36)  # ... then kept time: a burst
    shedder.observe_probe(0.001, 0.5)
    assert not shedder.overloaded
    shedder.observe_probe(0.3, 0.85)  # starved again, and again: each interval's only sample is late
    shedder.observe_probe(0.3, 1.2)
    assert shedder.overloaded and shedder.intervals_above == 1


def test_heartbeats_answered_late_decide_though_the_loop_is_late_by_less() -> None:
    """A heartbeat goes through the event loop several times (read, write, wake-up, answer): its
    time in the server can stand above the target while the loop runs late by less. The answered
    heartbeats decide; the probe decides only an interval in which none was answered."""
    shedder = CoDelShedder(target_s=0.1, interval_s=0.2)
    now = 0.0
    for _ in range(50):  # 0.5 s: the loop 40 ms late, every heartbeat answered 160 ms after it arrived
        shedder.observe_probe(0.04, now)
        shedder.observe(0.16, now + 0.005)
        now += 0.01
    assert shedder.overloaded and shedder.intervals_above >= 2
    for _ in range(50):  # nothing answered (the database stalls): the probe finds the queue's head waiting
        shedder.observe_probe(0.3, now)
        now += 0.01
    assert shedder.intervals_above >= 4
    for _ in range(50):  # answered quickly again, the loop still a little late
        shedder.observe_probe(0.15, now)
        shedder.observe(0.01, now + 0.005)
        now += 0.01
    assert shedder.intervals_above == 0


def test_retry_after_grows_with_the_refused_share_and_shrinks_after() -> None:
    """Refused devices come back after Retry-After: while many of those deciding are refused
    they come back too often, so it grows by the share over the budget each second (up to its
    maximum); it shrinks slowly once few are refused (those told to wait long are still away)."""
    shedder = CoDelShedder(target_s=0.05, interval_s=0.1, retry_after_max_s=20)
    assert shedder.retry_after == 1 and shedder.retry_after_s == 1
    now = feed(shedder, [80] * 1_000, 0.0)  # overloaded, the limit about 50
    for _ in range(3):  # 3 s: one refusal for every three admitted (a quarter refused)
        for i in range(1_000):
            shedder.admit(10)
            if i % 3 == 0:
                shedder.admit(1_000)
            shedder.observe(0.08, now)
            now += 0.001
    assert shedder.refused_share > 0.2 and shedder.retry_after >= 16, shedder.retry_after
    now = feed(shedder, [80] * 3_000, now)  # 3 s without a refusal
    assert shedder.refused_share == 0 and 10 <= shedder.retry_after < 20, shedder.retry_after
    feed(shedder, [1] * 40_000, now)
    assert shedder.retry_after == 1


def test_each_refusal_names_a_retry_after_drawn_evenly_up_to_the_current_one() -> None:
    """The refused come back spread out, some soon: none waits longer than the current
    Retry-After, and every whole second from 1 to it is named about as often."""
    rng = random.Random(7)
    shedder = CoDelShedder(target_s=0.05, interval_s=0.1, rng=rng.random)
    shedder.retry_after = 10.0
    counts = Counter(shedder.retry_after_s for _ in range(10_000))
    assert set(counts) == set(range(1, 11))
    assert all(800 <= n <= 1_200 for n in counts.values()), counts


class WaitClock:
    """The worker's run delay (seconds waited for a CPU), advanced by the test."""

    def __init__(self) -> None:
        self.waited = 0.0

    def __call__(self) -> float:
        return self.waited


def feed_starved(shedder: CoDelShedder, clock: WaitClock, samples_ms: list[float], start_s: float,
                 wait_share: float, step_s: float = 0.001) -> float:
    """``feed``, the worker waiting ``wait_share`` of the time for a CPU."""
    now = start_s
    for ms in samples_ms:
        shedder.admit(0)
        clock.waited += wait_share * step_s
        shedder.observe(ms / 1000, now)
        now += step_s
    return now


def test_a_queue_from_a_cpu_taken_by_other_work_refuses_nothing_until_it_is_much_longer() -> None:
    # A test suite takes the cores: heartbeats wait 150 ms (3x the target), the worker waits half
    # the time for a CPU. Not an overload of ours: nothing refused.
    clock = WaitClock()
    shedder = CoDelShedder(target_s=0.05, interval_s=0.1, run_delay=clock)
    now = feed_starved(shedder, clock, [150] * 2_000, 0.0, wait_share=0.5)
    assert not shedder.overloaded and shedder.limit == 5_000
    assert shedder.starved_share == pytest.approx(0.5, abs=0.01)
    # The same wait without the CPU taken away is an overload.
    unstarved = CoDelShedder(target_s=0.05, interval_s=0.1, run_delay=WaitClock())
    feed(unstarved, [150] * 2_000, 0.0)
    assert unstarved.overloaded
    # Starved, but waiting past STARVED_TARGET_FACTOR x the target: too little CPU is left for
    # what arrives, so it sheds.
    feed_starved(shedder, clock, [50 * STARVED_TARGET_FACTOR + 20] * 300, now, wait_share=0.5)
    assert shedder.overloaded and shedder.limit < 5_000


def test_a_short_wait_for_the_cpu_does_not_hide_an_overload() -> None:
    clock = WaitClock()
    shedder = CoDelShedder(target_s=0.05, interval_s=0.1, run_delay=clock)
    feed_starved(shedder, clock, [150] * 1_000, 0.0, wait_share=STARVED_SHARE / 2)
    assert shedder.overloaded


def test_the_run_delay_is_the_time_this_thread_waited_for_a_cpu() -> None:
    # This thread and a busy process share one CPU for 0.4 s: it waits about half of it.
    affinity = os.sched_getaffinity(0)
    cpu = min(affinity)
    spinner = subprocess.Popen([sys.executable, "-c", "import os, time\n"
                                f"os.sched_setaffinity(0, {{{cpu}}})\n"
                                "t = time.monotonic() + 3\nwhile time.monotonic() < t: pass"])
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.3)  # the spinner is running
        first = run_delay_s()
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:
            pass
        waited = run_delay_s() - first
    finally:
        os.sched_setaffinity(0, affinity)
        spinner.kill()
        spinner.wait()
    assert 0.05 < waited < 0.4, waited
