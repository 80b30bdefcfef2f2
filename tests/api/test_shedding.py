"""The CoDel-style admission control: a burst is tolerated, a standing queue is shed, and the
shedding ends soon after the queue does (samples and clock fed by the test)."""

from __future__ import annotations

import random

from api.shedding import SHED_MAX, CoDelShedder


def feed(shedder: CoDelShedder, samples_ms: list[float], start_s: float, step_s: float = 0.01) -> float:
    """One sample every ``step_s``; returns the time after the last."""
    now = start_s
    for ms in samples_ms:
        shedder.observe(ms / 1000, now)
        now += step_s
    return now


def test_a_burst_shorter_than_the_interval_sheds_nothing() -> None:
    shedder = CoDelShedder(target_s=0.02, interval_s=0.1)
    # 80 ms of 150 ms waits, then the queue drains: every interval has a sample under the target
    now = feed(shedder, [150] * 8 + [1] * 2, 0.0)
    now = feed(shedder, [150] * 8 + [1] * 2 + [1] * 10, now)
    assert shedder.shed_fraction == 0.0 and shedder.admit()


def test_a_standing_queue_is_shed_more_the_longer_it_stands_but_never_entirely() -> None:
    shedder = CoDelShedder(target_s=0.02, interval_s=0.1)
    now = feed(shedder, [40] * 12, 0.0)  # one full interval above the target
    first = shedder.shed_fraction
    assert first > 0 and shedder.intervals_above == 1
    now = feed(shedder, [40] * 30, now)
    assert shedder.shed_fraction > first
    now = feed(shedder, [500] * 200, now)
    assert shedder.shed_fraction == SHED_MAX < 1


def test_shedding_ends_within_two_seconds_of_the_queue_draining() -> None:
    shedder = CoDelShedder(target_s=0.02, interval_s=0.1)
    now = feed(shedder, [500] * 200, 0.0)
    assert shedder.shed_fraction == SHED_MAX
    now = feed(shedder, [1] * 220, now)  # 2.2 s under the target (19 intervals + the one it started in)
    assert shedder.shed_fraction == 0.0 and shedder.intervals_above == 0


def test_admission_refuses_about_the_shed_fraction() -> None:
    rng = random.Random(5)
    shedder = CoDelShedder(target_s=0.02, interval_s=0.1, rng=rng.random)
    feed(shedder, [60] * 22, 0.0)  # two intervals at 3 x the target: 0.2 + 0.2
    assert abs(shedder.shed_fraction - 0.4) < 1e-9
    refused = sum(1 for _ in range(10_000) if not shedder.admit())
    assert 3_700 <= refused <= 4_300


def test_intervals_the_probe_was_starved_through_are_judged_by_its_late_samples() -> None:
    shedder = CoDelShedder(target_s=0.02, interval_s=0.1)
    feed(shedder, [1] * 5, 0.0)  # a good start
    shedder.observe_probe(0.3, 0.35)  # the probe ran 300 ms late: no sample in between
    shedder.observe_probe(0.001, 0.36)  # ... then kept time: a burst
    shedder.observe_probe(0.001, 0.5)
    assert shedder.shed_fraction == 0
    shedder.observe_probe(0.3, 0.85)  # starved again, and again: each interval's only sample is late
    shedder.observe_probe(0.3, 1.2)
    assert shedder.shed_fraction > 0 and shedder.intervals_above == 1


def test_heartbeats_answered_late_are_shed_though_the_loop_is_late_by_less() -> None:
    """A heartbeat goes through the event loop several times (read, write, wake-up, answer): its
    time in the server can stand above the target while the loop runs late by less. The answered
    heartbeats decide; the probe decides only an interval in which none was answered."""
    shedder = CoDelShedder(target_s=0.1, interval_s=0.2)
    now = 0.0
    for _ in range(50):  # 0.5 s: the loop 40 ms late, every heartbeat answered 160 ms after it arrived
        shedder.observe_probe(0.04, now)
        shedder.observe(0.16, now + 0.005)
        now += 0.01
    assert shedder.shed_fraction > 0 and shedder.intervals_above >= 2
    for _ in range(50):  # nothing answered (the database stalls): the probe finds the queue's head waiting
        shedder.observe_probe(0.3, now)
        now += 0.01
    assert shedder.intervals_above >= 4
    for _ in range(50):  # answered quickly again, the loop still a little late: the share falls
        shedder.observe_probe(0.15, now)
        shedder.observe(0.01, now + 0.005)
        now += 0.01
    assert shedder.intervals_above == 0


def test_retry_after_grows_while_many_are_refused_and_shrinks_after() -> None:
    """Refused devices come back after Retry-After: while the refused share stays high they come
    back too often, so it doubles each second (up to its maximum); it shrinks slowly once few
    are refused (those told to wait long are still away)."""
    shedder = CoDelShedder(target_s=0.02, interval_s=0.1, retry_after_max_s=20)
    assert shedder.retry_after_s == 1
    now = feed(shedder, [500] * 300, 0.0)  # 3 s of a standing queue
    assert 2 <= shedder.retry_after_s <= 8, shedder.retry_after
    now = feed(shedder, [500] * 500, now)  # 5 s more: at its maximum
    assert shedder.retry_after_s == 20
    now = feed(shedder, [1] * 500, now)  # the queue drained: 5 s, the share back to none
    assert shedder.shed_fraction == 0 and 10 <= shedder.retry_after_s < 20, shedder.retry_after
    feed(shedder, [1] * 4000, now)
    assert shedder.retry_after_s == 1
