"""Overload: about twice the rate the server sustains (measured first, on this machine). The
server must stay up, shed with 503 + Retry-After rather than let latency grow, lose nothing it
acknowledged, and answer normally as soon as the load drops."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import text

from api.contract import HEARTBEAT_WRITE_SECONDS
from api.pool_health import local_postgres_cpu
from tests.faults.conftest import enroll_fleet
from tests.faults.loadgen import LoadDriver, LoadResult
from tests.faults.report import ScenarioRow, record
from tests.faults.test_faults import assert_nothing_lost, http_status
from tests.support.live import stop_server
from tests.support.metrics_scrape import bucket_delta, histogram_quantile, scrape

ACK_SECONDS = HEARTBEAT_WRITE_SECONDS
WARMUP_S = 3.0  # connections being opened; left out of the latency bound


def window_pct(result: LoadResult, since: float, until: float, pct: float) -> float:
    values = sorted(lat for start, lat, _, _ in result.attempts if since <= start < until)
    return values[min(len(values) - 1, int(len(values) * pct / 100))] if values else 0.0


def timeline(result: LoadResult, duration_s: float, step_s: float = 10.0) -> str:
    """Per ``step_s`` of the run: acknowledged and refused per second, and the refusals' median
    Retry-After."""
    parts = []
    t = 0.0
    while t < duration_s:
        window = [(status, ra) for start, _, status, ra in result.attempts if t <= start < t + step_s]
        refused = sorted(ra for status, ra in window if status == 503)
        acked = sum(1 for status, _ in window if status == 200)
        retry = f" RA {refused[len(refused) // 2]:.0f} s" if refused else ""
        parts.append(f"{t:.0f}-{t + step_s:.0f} s: {acked / step_s:.0f} acked/s "
                     f"{len(refused) / step_s:.0f} refused/s{retry}")
        t += step_s
    return "; ".join(parts)


def ack_buckets(server) -> list[tuple[float, float]]:
    """The server's own histogram of acknowledged heartbeats' times, from each request's arrival
    at the server to its COMMIT (read on the operator plane: no cost to the device worker)."""
    return scrape(server.admin_url, server.admin_key).buckets(ACK_SECONDS)


def schedstat_s(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a process's main thread, from
    Linux's /proc/PID/schedstat: the second says how much the machine held the process back."""
    on_cpu_ns, waiting_ns, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(on_cpu_ns) / 1e9, int(waiting_ns) / 1e9


class CpuMeter:
    """CPU seconds used by the load driver (this process), the server's worker and PostgreSQL,
    and the worker's wait for a CPU, read before and after a phase: on a 2-core machine they
    share the cores (with whatever else runs there), so each phase says what each took."""

    def __init__(self, server, engine) -> None:
        self.worker = psutil.Process(server.proc.pid).children()[0]
        with engine.connect() as conn:
            self.backend_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        self.host = engine.url.host

    def read(self) -> dict[str, float]:
        """CPU seconds so far by role, the worker's wait for a CPU, and the wall clock."""
        own, worker = psutil.Process().cpu_times(), self.worker.cpu_times()
        postgres, _ = local_postgres_cpu(self.host, self.backend_pid)
        return {"driver": own.user + own.system, "worker": worker.user + worker.system,
                "postgres": postgres.seconds if postgres else 0.0,
                "worker_waiting": schedstat_s(self.worker.pid)[1], "wall": time.monotonic()}

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Cores used by each role between two readings (and the worker's wait for a CPU)."""
        wall = after["wall"] - before["wall"]
        return {role: (after[role] - before[role]) / wall for role in before if role != "wall"}

    @staticmethod
    def text(cores: dict[str, float]) -> str:
        return (f"CPU cores: driver {cores['driver']:.2f}, worker {cores['worker']:.2f} (and "
                f"{cores['worker_waiting']:.2f} waiting for a CPU), postgres {cores['postgres']:.2f}")


def sustainable(server, engine, devices, calibration_s: float, skip_rounds: int) -> tuple[float, dict, int]:
    """(heartbeats/s, CPU cores by role, requests sent) of ``server`` (one worker that never
    sheds) saturated by 1,000 concurrent clients for ``calibration_s``; stops it after. Counted
    after the first 2 s (connections and token look-ups): over 2 s, in 4 runs on 2026-12-01 the
    same server gave 2,325 to 3,113/s."""
    cpu = CpuMeter(server, engine)
    cpu0 = cpu.read()
    calibration = LoadDriver(server.url, devices, duration_s=calibration_s, concurrency=1000, drain_s=2,
                             skip_rounds=skip_rounds).run()
    cores = CpuMeter.cores(cpu0, cpu.read())
    stop_server(server)
    assert not calibration.statuses().get(503), calibration.statuses()
    rate = sum(1 for t in calibration.ack_times if 2.0 <= t < calibration_s) / (calibration_s - 2.0)
    return rate, cores, calibration.sent


def overload(fault_servers, engine, duration_s: float, label: str, drain_s: float = 10,
             calibration_s: float = 10.0, after: bool = True) -> None:
    # The server's own latency histogram gives its view of the admitted heartbeats; the
    # client's view also carries the load driver's CPU starvation on a shared 2-core machine.
    # One worker: on a 2-core machine the load driver needs the other core to offer twice what
    # the server sustains (with two workers it could not, and "overload" would not be one).
    # The sustainable rate: what a server that never sheds stores when saturated by many
    # concurrent clients (group commit batches grow with load, so a few hundred clients would
    # understate it and "twice" would not be an overload); measured on a server of its own, so
    # that shedding (and the Retry-After it makes clients wait) cannot lower it.
    calibration_server = fault_servers(workers=1, INGEST_SHED_TARGET_MS="3600000")
    devices = enroll_fleet(calibration_server, 3000)
    rate, calibration_cores, calibration_sent = sustainable(calibration_server, engine, devices, calibration_s, 0)
    # The server under test, its token cache warmed (one heartbeat per device, at a concurrency
    # it serves without a queue) as a fleet's steady state has it.
    server = fault_servers(workers=1)
    warm = LoadDriver(server.url, devices, duration_s=3, concurrency=100, drain_s=2,
                      skip_rounds=calibration_sent // len(devices) + 1).run()
    rounds = (calibration_sent + warm.sent) // len(devices) + 2
    cpu = CpuMeter(server, engine)
    # New heartbeats at twice that rate, whatever the answers; each device sends its own one at
    # a time and, told to retry after N s, sends nothing for N s (see LoadDriver._device).
    driver = LoadDriver(
        server.url, devices, duration_s=duration_s, rate_per_s=2 * rate, drain_s=drain_s, timeout_s=15,
        skip_rounds=rounds, device_backoff=True,
    )
    # The server's own view of the overload phase only: the calibration's requests (1,000 at once
    # against a cold token cache) and the recovery probes are left out.
    before = ack_buckets(server)
    cpu1 = cpu.read()
    result = driver.run()
    overload_cores = CpuMeter.cores(cpu1, cpu.read())
    server_side = bucket_delta(ack_buckets(server), before)
    # Recovery: once the load has stopped, heartbeats are acknowledged promptly again.
    t_end = driver.now()
    recovered = None
    while driver.now() < t_end + 10:
        probe = LoadDriver(server.url, devices[:50], duration_s=0.3, concurrency=4, drain_s=0,
                           skip_rounds=rounds + 400).run()
        if probe.statuses().keys() == {200} and probe.latency_pct(99) < 0.5:
            recovered = driver.now() - t_end
            break
        time.sleep(0.2)
    # The machine's speed moves (a shared host: the same calibration gave 2,873 to 4,154/s within
    # 20 minutes on 2026-12-01), so the 60 s run measures the sustainable rate again after the
    # overload and compares against the mean of the two.
    rate_after = None
    if after:
        rate_after, _, _ = sustainable(fault_servers(workers=1, INGEST_SHED_TARGET_MS="3600000"), engine, devices,
                                       calibration_s, rounds + 500)
    rate_before, rate = rate, (rate + rate_after) / 2 if rate_after else rate
    statuses = result.statuses()
    shed = statuses.get(503, 0)
    during = result.statuses(until=duration_s)
    attempts_per_s = sum(during.values()) / duration_s
    refused_per_s = during.get(503, 0) / duration_s
    steady_p99 = window_pct(result, WARMUP_S, duration_s, 99)
    third = (duration_s - WARMUP_S) / 3
    mid_p50 = window_pct(result, WARMUP_S + third, WARMUP_S + 2 * third, 50)
    last_p50 = window_pct(result, WARMUP_S + 2 * third, duration_s, 50)
    server_p99_ack = histogram_quantile(0.99, server_side)
    server_p50_ack = histogram_quantile(0.50, server_side)
    within_300_ms = dict(server_side)[0.3] / server_side[-1][1] if server_side[-1][1] else 0.0
    # Goodput: heartbeats acknowledged per second while the overload lasted, against what the
    # server sustains when nothing is refused.
    acked_per_s = sum(1 for t in result.ack_times if t < duration_s) / duration_s
    goodput_pct = 100 * acked_per_s / rate if rate else 0.0
    # The same per CPU-second of the worker: on a shared machine the worker's share of a CPU
    # moves between the two phases; this says how much of what it did was acknowledging.
    calibration_per_cpu_s = rate_before / calibration_cores["worker"] if calibration_cores["worker"] else 0.0
    per_cpu_s = acked_per_s / overload_cores["worker"] if overload_cores["worker"] else 0.0
    efficiency_pct = 100 * per_cpu_s / calibration_per_cpu_s if calibration_per_cpu_s else 0.0
    measured = f"{rate_before:.0f}/s before, {rate_after:.0f}/s after" if rate_after else f"{rate:.0f}/s"
    note = (f"1 worker: sustainable {rate:.0f}/s ({measured}; {CpuMeter.text(calibration_cores)}); "
            f"offered {result.created / duration_s:.0f} new heartbeats/s for {duration_s:.0f} s "
            f"({attempts_per_s:.0f} requests/s incl. retries, {refused_per_s:.0f}/s refused; "
            f"{CpuMeter.text(overload_cores)}); acknowledged {acked_per_s:.0f}/s = {goodput_pct:.0f} % "
            f"of sustainable (target >= 95 %: {'met' if goodput_pct >= 95 else 'NOT met'}); per CPU-second "
            f"of the worker {per_cpu_s:.0f} acknowledged against {calibration_per_cpu_s:.0f} when "
            f"sustaining = {efficiency_pct:.0f} %; "
            f"admitted heartbeats' server-side p99 {server_p99_ack * 1000:.0f} ms (target <= 300: "
            f"{'met' if within_300_ms >= 0.99 else 'NOT met'}: {100 * within_300_ms:.1f} % within 300 ms), "
            f"p50 {server_p50_ack * 1000:.0f} ms; client-side p99 "
            f"{steady_p99 * 1000:.0f} ms, p50 {mid_p50 * 1000:.0f} -> {last_p50 * 1000:.0f} ms; "
            f"still on the devices at the end {result.unacked}")
    print(f"\n{label}: {note}; statuses {statuses}\n  {timeline(result, duration_s, max(1.0, duration_s / 6))}")
    # It stayed up: the master and its worker live, and every answer was a 200 or a 503;
    # a client-side timeout or connection error (status 0: never acknowledged, so never lost;
    # a device retries it) is tolerated for under 2 % of requests. The load driver shares the 2
    # cores with the server; measured up to 1.2 % in runs on 2026-11-27.
    assert server.proc.poll() is None and len(psutil.Process(server.proc.pid).children()) == 1
    assert set(statuses) <= {0, 200, 503}, statuses
    assert statuses.get(0, 0) < 0.02 * result.sent, note
    assert shed > 0, f"nothing shed at {2 * rate_before:.0f}/s offered: {statuses}"
    assert result.missing_retry_after() == 0
    # The server's own latency stays bounded (by the shedding thresholds plus the flush and CPU
    # waits of a shared 2-core machine: hence the generous p99).
    assert server_p50_ack < 1.0, note
    assert server_p99_ack < 8.0, note
    assert recovered is not None, "no prompt acknowledgement within 10 s of the load dropping"
    assert http_status(server.url + "/readyz")[0] == 200
    check = assert_nothing_lost(engine, result)
    record(ScenarioRow(label, result.sent, result.ack_count, check["lost"], check["duplicates"], recovered, note))


def test_overload_short_sheds_and_recovers(fault_servers, engine):
    overload(fault_servers, engine, 5.0, "overload 2x, 5 s", drain_s=4, calibration_s=4.0, after=False)


@pytest.mark.slow
def test_overload_60s_sheds_and_recovers(fault_servers, engine):
    # The targets (>= 95 % of the sustainable rate acknowledged, admitted heartbeats' server-side
    # p99 <= 300 ms) are printed with the figures, met or not: on a machine shared with other work
    # the sustainable rate itself moves during the run, so they are read, not asserted.
    overload(fault_servers, engine, 60.0, "overload 2x, 60 s")
