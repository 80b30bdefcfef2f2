"""Simulator pieces without a server: schedule, histograms, verdict, device bodies; and the
generator against the benchmark's tiny HTTP sink (a real socket server in a subprocess)."""

from __future__ import annotations

import random
import statistics
import time
from datetime import datetime

import msgspec
import pytest

from api.schemas import HeartbeatIn
from simulator import report as rep
from simulator.devices import (
    Behaviour,
    Device,
    WallClock,
    first_send_offset_s,
    next_send_s,
    retry_delay_s,
    version_at,
)
from simulator.stats import Stats, merge, new_histogram, percentiles_ms, record_us

# -- schedule ---------------------------------------------------------------------------------


def test_first_sends_are_spread_evenly_over_one_interval() -> None:
    rng = random.Random(3)
    offsets = [first_send_offset_s(i, 10_000, 60.0, 0.0, rng) for i in range(10_000)]
    assert min(offsets) >= 0 and max(offsets) < 60.0
    per_6s = [0] * 10
    for o in offsets:
        per_6s[int(o // 6)] += 1
    # no thundering herd: every tenth of the interval gets roughly a tenth of the fleet
    assert all(850 <= n <= 1150 for n in per_6s), per_6s


def test_ramp_up_activates_devices_progressively() -> None:
    rng = random.Random(4)
    n = 1000
    offsets = [first_send_offset_s(i, n, 10.0, 100.0, rng) for i in range(n)]
    for i, o in enumerate(offsets):
        activation = 100.0 * i / n
        assert activation <= o < activation + 10.0
    assert sum(1 for o in offsets if o < 50) < 0.6 * n


def test_next_send_stays_within_the_jitter_bounds_and_keeps_the_rate() -> None:
    rng = random.Random(5)
    t, gaps = 0.0, []
    for _ in range(20_000):
        nxt = next_send_s(t, 60.0, 15.0, rng)
        gaps.append(nxt - t)
        t = nxt
    assert 45.0 <= min(gaps) and max(gaps) <= 75.0
    assert min(gaps) < 46 and max(gaps) > 74  # the whole band is used
    assert abs(statistics.mean(gaps) - 60.0) < 0.3


def test_schedule_follows_intended_times_not_answer_times() -> None:
    # open loop: the next send is computed from the previous *intended* time only
    rng_a, rng_b = random.Random(9), random.Random(9)
    assert next_send_s(120.0, 60.0, 15.0, rng_a) == next_send_s(120.0, 60.0, 15.0, rng_b)


def test_retry_delay_honours_retry_after_and_backs_off() -> None:
    rng = random.Random(1)
    for attempt in range(1, 6):
        assert retry_delay_s(attempt, 2.0, rng) >= 2.0
    first = [retry_delay_s(1, None, rng) for _ in range(200)]
    fourth = [retry_delay_s(4, None, rng) for _ in range(200)]
    assert max(first) <= 0.375 and min(fourth) >= 2.0
    assert max(retry_delay_s(20, None, rng) for _ in range(100)) <= 45.0  # capped
    assert len({round(d, 6) for d in fourth}) > 100  # jittered, not synchronised


# -- devices ----------------------------------------------------------------------------------


def test_device_body_passes_the_servers_schema_and_state_evolves() -> None:
    rng = random.Random(2)
    behaviour = Behaviour(interval_s=1.0, jitter_s=0.25, rollout_start_s=10, rollout_end_s=20)
    device = Device(0, 1, "sim-x-0", "tok", rng, flaky=False, rollout_at=0.5)
    clock = WallClock()
    seen_batteries, versions = set(), []
    for step in range(400):
        device.advance(behaviour, step * 0.1, rng)
        hb = msgspec.json.decode(device.body(clock.now_iso()), type=HeartbeatIn)
        seen_batteries.add(hb.battery_pct)
        versions.append(hb.app_version)
    assert len(seen_batteries) > 5
    assert versions[0] == "1.0.0" and versions[-1] == "1.1.0"
    assert device.auth_header == b"Authorization: Bearer tok\r\n"


def test_rollout_reaches_a_growing_share_of_the_fleet() -> None:
    behaviour = Behaviour(rollout_start_s=10, rollout_end_s=20)
    thresholds = [random.Random(i).random() for i in range(1000)]
    share = [sum(version_at(behaviour, t, u) == "1.1.0" for u in thresholds) for t in (5, 12, 15, 18, 25)]
    assert share[0] == 0 and share[-1] == 1000
    assert share == sorted(share) and 400 <= share[2] <= 600


def test_flaky_devices_lose_answers_and_go_offline() -> None:
    rng = random.Random(8)
    behaviour = Behaviour(interval_s=1.0, jitter_s=0.1, lost_answer_prob=0.5, offline_prob=0.1)
    steady = Device(0, 1, "a", "t", rng, flaky=False, rollout_at=1.0)
    flaky = Device(1, 2, "b", "t", rng, flaky=True, rollout_at=1.0)
    assert not any(steady.loses_answer(behaviour, rng) for _ in range(100))
    assert 30 < sum(flaky.loses_answer(behaviour, rng) for _ in range(100)) < 70
    went = [t for t in range(200) if flaky.maybe_go_offline(behaviour, float(t), rng)]
    assert went and flaky.offline_until_s > went[-1]
    assert flaky.is_offline(went[-1] + 0.5)


def test_wall_clock_formats_rfc3339_with_milliseconds() -> None:
    text = WallClock().now_iso(1_700_000_000.25)
    assert text == "2023-11-14T22:13:20.250Z"
    assert datetime.fromisoformat(text).timestamp() == 1_700_000_000.25


# -- histograms -------------------------------------------------------------------------------


def test_record_us_matches_the_packages_record_value() -> None:
    rng = random.Random(11)
    values = [int(rng.lognormvariate(8, 1.5)) for _ in range(5000)] + [1, 999_999, 119_000_000]
    ours, theirs = new_histogram(), new_histogram()
    for v in values:
        record_us(ours, v)
        theirs.record_value(v)
    assert list(ours.counts) == list(theirs.counts)
    assert (ours.total_count, ours.min_value, ours.max_value) == (theirs.total_count, theirs.min_value,
                                                                    theirs.max_value)
    mine = percentiles_ms(ours)
    for name, pct in (("p50", 50), ("p95", 95), ("p99", 99), ("p999", 99.9)):
        assert mine[name] == round(min(theirs.get_value_at_percentile(pct), theirs.max_value) / 1000, 3)


def test_values_beyond_the_range_are_clamped_not_dropped() -> None:
    hist = new_histogram()
    record_us(hist, 10**12)
    record_us(hist, -5)
    assert hist.total_count == 2 and percentiles_ms(hist)["max"] == 120_000.0


def test_histograms_merge_into_the_same_percentiles_as_one() -> None:
    rng = random.Random(12)
    values = [rng.randint(200, 400_000) for _ in range(20_000)]
    whole, parts = new_histogram(), [new_histogram() for _ in range(4)]
    for i, v in enumerate(values):
        record_us(whole, v)
        record_us(parts[i % 4], v)
    merged = new_histogram()
    for part in parts:
        merge(merged, part)
    assert percentiles_ms(merged) == percentiles_ms(whole)
    assert merged.total_count == 20_000
    p = percentiles_ms(whole)
    exact = sorted(values)
    assert abs(p["p99"] - exact[int(0.99 * len(exact)) - 1] / 1000) <= exact[-1] / 1000 * 0.002 + 0.01


def test_stats_windows_roll_into_the_total() -> None:
    stats = Stats()
    for ms in (1, 2, 3):
        stats.record("heartbeat", ms * 1000)
    stats.record("heartbeat", 5000, "http_503")
    window = stats.kinds["heartbeat"].roll_window()
    assert window["ok"] == 3 and window["errors"] == 1
    stats.record("heartbeat", 4000)
    hb = stats.kinds["heartbeat"]
    assert hb.total.total_count == 3 and hb.cumulative_hist().total_count == 4
    assert hb.errors_by_kind == {"http_503": 1}


def test_empty_histogram_has_no_percentiles() -> None:
    assert percentiles_ms(new_histogram()) == {"p50": None, "p95": None, "p99": None, "p999": None, "max": None}


# -- verdict ----------------------------------------------------------------------------------

GOOD = {"p50": 5.0, "p95": 40.0, "p99": 90.0, "p999": 200.0, "max": 250.0}


def test_verdict_passes_when_every_target_holds() -> None:
    checks = rep.check_slis(GOOD, None, 0.1, 0, 0, None)
    all_met, failed = rep.verdict(checks)
    assert all_met and failed == []
    assert {c.name: c.status for c in checks}["pool utilisation (sustained)"] == "N/A"
    assert rep.summary_line(all_met, failed) == "ALL SLI TARGETS MET"


@pytest.mark.parametrize(
    ("hb", "read", "err", "lost", "dups", "pool", "expect"),
    [
        ({**GOOD, "p95": 150.0}, None, 0.0, 0, 0, None, ["heartbeat p95"]),  # the target is strict
        ({**GOOD, "p99": 301.0}, None, 0.0, 0, 0, None, ["heartbeat p99"]),
        (GOOD, None, 0.5, 0, 0, None, ["error rate"]),
        (GOOD, None, 0.0, 1, 0, None, ["acknowledged heartbeats lost"]),
        (GOOD, None, 0.0, 0, 2, None, ["duplicates stored"]),
        (GOOD, {"p95": 25.0}, 0.0, 0, 0, None, ["fast read p95"]),
        (GOOD, None, 0.0, 0, 0, 85.0, ["pool utilisation (sustained)"]),
        ({"p95": None, "p99": None}, None, None, 0, 0, None, ["heartbeat p95", "heartbeat p99", "error rate"]),
    ],
)
def test_verdict_names_what_failed(hb, read, err, lost, dups, pool, expect) -> None:
    all_met, failed = rep.verdict(rep.check_slis(hb, read, err, lost, dups, pool))
    assert not all_met and failed == expect
    assert rep.summary_line(all_met, failed) == "SLI TARGETS NOT MET: " + ", ".join(expect)


def test_unchecked_loss_is_not_applicable_rather_than_passing() -> None:
    checks = {c.name: c.status for c in rep.check_slis(GOOD, None, 0.0, None, None, None)}
    assert checks["acknowledged heartbeats lost"] == "N/A"


def test_sustained_pool_utilisation_ignores_short_spikes() -> None:
    assert rep.sustained_pool_pct([]) is None
    spike = [20.0] * 30 + [99.0] * 3 + [20.0] * 30
    assert rep.sustained_pool_pct(spike) < 80
    plateau = [20.0] * 10 + [90.0] * 12 + [20.0] * 10
    assert rep.sustained_pool_pct(plateau) == 90.0


# -- the generator against a real (trivial) HTTP server ----------------------------------------


@pytest.fixture
def slow_sink():
    from simulator.bench import start_sink

    proc, port = start_sink(delay_ms=150)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def _fleet(n: int):
    from simulator.server import EnrolledDevice

    return [EnrolledDevice(i + 1, f"u-{i}", f"token-{i}") for i in range(n)]


def test_latency_counts_from_the_intended_send_time(slow_sink: str) -> None:
    from simulator.runner import Job, LoadRun, SimConfig
    from simulator.transport import RawConnection

    cfg = SimConfig(url=slow_sink, admin_key="k", devices=1, duration_s=1, interval_s=1, jitter_s=0)
    run = LoadRun(cfg, _fleet(1), emit=lambda s: None)
    run.t0 = time.perf_counter()
    device = run.devices[0]
    device.app_version = "1.0.0"
    late = Job(device, intended_s=-0.3)  # the generator is 300 ms behind this send
    run._send_heartbeat(RawConnection(slow_sink, 5), late)
    latency = percentiles_ms(run.stats.kinds["heartbeat"].window)["max"]
    lag = percentiles_ms(run.lag_window)["max"]
    assert 440 <= latency < 1000  # 300 ms late + 150 ms server, not just the 150 ms round trip
    assert 295 <= lag < 800


def test_a_slow_server_does_not_slow_the_offered_load(slow_sink: str) -> None:
    from simulator.runner import LoadRun, SimConfig

    cfg = SimConfig(url=slow_sink, admin_key="k", devices=100, duration_s=2.0, interval_s=0.5, jitter_s=0.1,
                    flaky_pct=0, drain_s=3)
    result = LoadRun(cfg, _fleet(100), emit=lambda s: None).run()
    hb = result.stats.kinds["heartbeat"]
    # 100 devices every 0.5 s for 2 s = 400 sends whatever the 150 ms answers cost
    assert 360 <= result.stats.sent <= 440 and hb.errors == 0
    assert percentiles_ms(hb.total)["p50"] >= 150
    assert len(result.series) >= 2 and result.series[0]["type"] == "progress"


def test_a_stop_request_ends_the_load_promptly_and_still_accounts_for_everything(slow_sink: str) -> None:
    from simulator.runner import LoadRun, SimConfig

    cfg = SimConfig(url=slow_sink, admin_key="k", devices=50, duration_s=60.0, interval_s=5.0, jitter_s=1.0,
                    flaky_pct=0, drain_s=5)
    # stopped at the first progress snapshot, one second into the load (a timer started before
    # run() would count the set-up too, which takes a while on a busy machine)
    load = LoadRun(cfg, _fleet(50), emit=lambda s: load.request_stop())
    started = time.perf_counter()
    result = load.run()
    # Bounds far below the 60 s duration, loose enough for a busy 2-core CI machine.
    assert time.perf_counter() - started < 10.0
    assert 0.5 <= result.load_s <= 4.0
    hb = result.stats.kinds["heartbeat"]
    assert hb.ok == result.stats.sent > 0 and result.abandoned == 0


def test_the_operator_plane_defaults_to_the_device_planes_host_on_admin_port() -> None:
    from simulator.__main__ import default_admin_url

    assert default_admin_url("http://127.0.0.1:8000") == "http://127.0.0.1:8001"
    assert default_admin_url("http://10.1.2.3:9000/") == "http://10.1.2.3:8001"
    assert default_admin_url("http://[::1]:8000") == "http://[::1]:8001"


@pytest.fixture
def sink():
    from simulator.bench import start_sink

    proc, port = start_sink()
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.parametrize(("mode", "connects_per_send"), [("per-device", None), ("new-connection", 1.0)])
def test_connection_modes_hold_connections_as_devices_do(sink: str, mode: str, connects_per_send) -> None:
    from simulator.runner import LoadRun, SimConfig

    cfg = SimConfig(url=sink, admin_key="k", devices=40, duration_s=2.0, interval_s=0.5, jitter_s=0.1,
                    flaky_pct=0, drain_s=3, connection_mode=mode, max_connections=4)
    result = LoadRun(cfg, _fleet(40), emit=lambda s: None).run()
    hb = result.stats.kinds["heartbeat"]
    assert hb.errors == 0 and hb.ok == result.stats.sent >= 120  # 40 devices, ~4 sends each
    if connects_per_send is None:  # each device opened its own connection once and kept it
        assert result.connects == 40 and result.connections >= 40
    else:  # a new connection every time
        assert result.connects == result.stats.sent


def test_pooled_devices_share_few_connections(sink: str) -> None:
    from simulator.runner import LoadRun, SimConfig

    cfg = SimConfig(url=sink, admin_key="k", devices=40, duration_s=2.0, interval_s=0.5, jitter_s=0.1,
                    flaky_pct=0, drain_s=3, max_connections=4)
    result = LoadRun(cfg, _fleet(40), emit=lambda s: None).run()
    assert result.stats.sent >= 120 and 1 <= result.connects <= 4 and result.connections <= 4


def test_read_mix_parses_weights_and_picks_by_them() -> None:
    from simulator.devices import ReadMix

    mix = ReadMix.parse("device_status:50,fleet_summary:5")
    assert (mix.device_status, mix.fleet_list, mix.fleet_summary) == (50, 0, 5)
    rng = random.Random(2)
    picks = [mix.pick(7, rng) for _ in range(11_000)]
    assert {p for _, p in picks} == {b"/v1/devices/7", b"/v1/fleet/summary"}
    summaries = sum(1 for name, _ in picks if name == "fleet_summary")
    assert 800 <= summaries <= 1200  # 1 in 11
    for bad in ("nope:1", "device_status:-1", "fleet_list:0"):
        with pytest.raises(ValueError):
            ReadMix.parse(bad)


def test_db_cpu_is_an_sli_of_its_own() -> None:
    """The seed's "DB CPU < 70 %": PostgreSQL's CPU seconds over the run, in % of its host's cores."""
    # 2 cores; 1.5 CPU-seconds used over 1 s of wall time: 75 % of the host.
    samples = [(100.0, 10.0, 2), (100.5, 10.7, 2), (101.0, 11.5, 2)]
    assert rep.db_cpu_pct(samples) == 75.0
    assert rep.db_cpu_pct(samples[:1]) is None
    all_met, failed = rep.verdict(rep.check_slis(GOOD, None, 0.0, 0, 0, None, rep.SEED_TARGETS, 75.0))
    assert not all_met and failed == ["DB CPU"]
    checks = {c.name: c.status for c in rep.check_slis(GOOD, None, 0.0, 0, 0, None, rep.SEED_TARGETS, 30.0)}
    assert checks["DB CPU"] == "PASS"
    checks = {c.name: c.status for c in rep.check_slis(GOOD, None, 0.0, 0, 0, None)}
    assert checks["DB CPU"] == "N/A"  # not measurable (database on another host): neither pass nor fail
