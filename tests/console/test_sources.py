"""console.sources: plain Python (no Textual), parsing, percentiles, and polls of a real server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from config.settings import PROJECT_ROOT
from console.sources.http import AUTH, DOWN, UNAVAILABLE, ApiClient
from console.sources.metrics import bucket_delta, diff_metrics, parse_metrics, quantile
from console.sources.server import ServerPoller, parse_fleet, parse_jobs, parse_pool_health
from console.sources.simulator import SimExited, SimOutput, SimParams, SimProgress, SimReport, live_verdict, parse_line
from tests.console.scenes import metrics_text
from tests.helpers import heartbeat_body
from tests.live import free_port


def test_sources_import_no_textual():
    code = (
        "import sys, pkgutil, importlib, console.sources as s\n"
        "for m in pkgutil.iter_modules(s.__path__): importlib.import_module('console.sources.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'textual' or n.startswith('textual.'))\n"
        "print(len(list(pkgutil.iter_modules(s.__path__))), bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    count, bad = out.stdout.strip().split(" ", 1)
    assert int(count) >= 6 and bad == "[]", out.stdout


def test_quantile_interpolates_within_the_bucket_like_histogram_quantile():
    buckets = ((0.1, 50.0), (0.2, 90.0), (0.3, 100.0), (float("inf"), 100.0))
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.15)
    assert quantile(0.95, buckets) == pytest.approx(0.25)
    assert quantile(0.5, ((0.1, 0.0), (float("inf"), 0.0))) is None
    # beyond the last finite edge: that edge, as Prometheus answers
    assert quantile(0.99, ((0.1, 50.0), (float("inf"), 100.0))) == pytest.approx(0.1)


def test_percentiles_and_rates_come_from_the_delta_between_two_scrapes():
    first = parse_metrics(
        '# TYPE nexmdm_heartbeat_write_seconds histogram\n'
        'nexmdm_heartbeat_write_seconds_bucket{le="0.01",worker="a"} 1000\n'
        'nexmdm_heartbeat_write_seconds_bucket{le="0.5",worker="a"} 1000\n'
        'nexmdm_heartbeat_write_seconds_bucket{le="+Inf",worker="a"} 1000\n'
        'nexmdm_heartbeat_write_seconds_count{worker="a"} 1000\n'
        '# TYPE nexmdm_heartbeats_accepted_total counter\nnexmdm_heartbeats_accepted_total 1000\n'
        '# TYPE nexmdm_heartbeats_rejected_total counter\nnexmdm_heartbeats_rejected_total{reason="x"} 0\n',
        10.0,
    )
    # 100 new observations, all slow, split over two label sets: the old fast ones must not dilute them
    second = parse_metrics(
        '# TYPE nexmdm_heartbeat_write_seconds histogram\n'
        'nexmdm_heartbeat_write_seconds_bucket{le="0.01",worker="a"} 1000\n'
        'nexmdm_heartbeat_write_seconds_bucket{le="0.5",worker="a"} 1050\n'
        'nexmdm_heartbeat_write_seconds_bucket{le="+Inf",worker="a"} 1050\n'
        'nexmdm_heartbeat_write_seconds_bucket{le="0.01",worker="b"} 0\n'
        'nexmdm_heartbeat_write_seconds_bucket{le="0.5",worker="b"} 50\n'
        'nexmdm_heartbeat_write_seconds_bucket{le="+Inf",worker="b"} 50\n'
        '# TYPE nexmdm_heartbeats_accepted_total counter\nnexmdm_heartbeats_accepted_total 1098\n'
        '# TYPE nexmdm_heartbeats_rejected_total counter\nnexmdm_heartbeats_rejected_total{reason="x"} 2\n',
        12.0,
    )
    assert diff_metrics(None, first) is None
    traffic = diff_metrics(first, second)
    assert traffic is not None and traffic.observations == 100
    assert 10.0 < traffic.p50_ms < 500.0 and traffic.p99_ms == pytest.approx(495.1, abs=0.5)
    assert traffic.heartbeats_per_s == pytest.approx(49.0) and traffic.errors_per_s == pytest.approx(1.0)
    assert traffic.error_pct == pytest.approx(2.0)


def test_counter_reset_and_missing_metrics_are_tolerated():
    assert bucket_delta(((0.1, 10.0), (float("inf"), 20.0)), ((0.1, 1.0), (float("inf"), 2.0))) == (
        (0.1, 1.0), (float("inf"), 2.0))
    empty_a, empty_b = parse_metrics("# nothing here\n", 1.0), parse_metrics("", 2.0)
    traffic = diff_metrics(empty_a, empty_b)
    assert traffic is not None and traffic.p95_ms is None and traffic.heartbeats_per_s is None
    assert traffic.error_pct is None


def test_deterministic_scene_metrics_parse_to_a_rising_tail():
    early = diff_metrics(parse_metrics(metrics_text(3), 1.0), parse_metrics(metrics_text(6), 2.0))
    late = diff_metrics(parse_metrics(metrics_text(150), 1.0), parse_metrics(metrics_text(153), 2.0))
    assert early and late and early.heartbeats_per_s == pytest.approx(600.0, rel=0.01)
    assert late.p99_ms > early.p99_ms > 150.0 and late.p50_ms < 20.0


def test_simulator_stream_lines():
    progress = parse_line(json.dumps({"t_s": 3, "sent": 600, "acked": 597, "errors": 3, "rate_per_s": 200,
                                      "p50_ms": 4.5, "p95_ms": 20, "p99_ms": 310, "p999_ms": 900}))
    assert isinstance(progress, SimProgress) and progress.acked == 597 and progress.error_pct == pytest.approx(0.5)
    ok, text = live_verdict(progress)
    assert ok is False and "p99 310" in text and "errors 0.50%" in text
    report = parse_line('{"type": "report", "report_path": "var/r.json", "verdict": "ALL SLI TARGETS MET"}')
    assert isinstance(report, SimReport) and report.passed is True and report.path == "var/r.json"
    failed = parse_line('{"type": "report", "path": "r.json", "verdict": "FAIL", "passed": false}')
    assert isinstance(failed, SimReport) and failed.passed is False
    # the simulator's own running verdict wins over the console's estimate
    judged = parse_line('{"type": "progress", "t_s": 5, "sent": 100, "acked": 100, "errors": 0, "p95_ms": 400,'
                        ' "error_rate_pct": 0.0, "verdict_so_far": "FAIL", "failing": ["heartbeat p95"]}')
    assert isinstance(judged, SimProgress) and live_verdict(judged) == (False, "FAILING: heartbeat p95")
    assert parse_line("enrolling 200 devices…") == SimOutput("enrolling 200 devices…")
    assert parse_line("   ") is None


def test_simulator_inputs_are_checked():
    params = SimParams.parse("200", "30", "1", "0.25")
    assert params.args() == ["--devices", "200", "--duration", "30", "--interval", "1", "--jitter", "0.25"]
    assert params.rate_per_s == 200
    for bad, field in ((("0", "30", "1", "0"), "devices"), (("2.5", "30", "1", "0"), "devices"),
                       (("10", "x", "1", "0"), "duration"), (("10", "30", "1", "1"), "jitter")):
        with pytest.raises(ValueError, match=field):
            SimParams.parse(*bad)


def test_payloads_in_the_shapes_the_observability_and_scheduler_branches_send():
    pool = parse_pool_health({"status": "WARN", "reasons": ["WARN: the pools of all workers may open 200"],
                              "workers": 2, "pool_size": 100, "max_overflow": 100, "capacity": 200, "in_use": 3,
                              "overflow": 0, "utilization_pct": 1.5})
    assert (pool.size, pool.capacity, pool.utilisation_pct, pool.status) == (100, 200, 1.5, "WARN")
    assert pool.reasons[0].startswith("WARN: the pools")
    jobs = parse_jobs({"runs": [
        {"run_id": 3, "job": "reconcile", "status": "succeeded", "trigger": "api",
         "started_at": "2026-11-27T12:00:00+00:00", "finished_at": "2026-11-27T12:00:01+00:00",
         "rows_affected": 0, "detail": {"healed": 0, "checked": 10}, "error": None},
        {"run_id": 2, "job": "nightly", "status": "failed", "detail": {"archived": 0},
         "error": "checksum mismatch\ntraceback…", "started_at": "2026-11-27T03:00:00+00:00"},
    ]})
    assert jobs["reconcile"].detail == "healed=0, checked=10" and jobs["nightly"].detail == "checksum mismatch"
    text = metrics_text(10).replace("nexmdm_heartbeat_write_seconds", "nexmdm_heartbeat_write_duration_seconds")
    text += ('# TYPE nexmdm_last_status_read_duration_seconds histogram\n'
             'nexmdm_last_status_read_duration_seconds_bucket{le="+Inf"} 5\n')
    sample = parse_metrics(text, 1.0)
    assert sample.latency_metric == "nexmdm_heartbeat_write_duration_seconds"


def test_endpoint_payloads_are_read_tolerantly():
    pool = parse_pool_health({"size": 50, "max_overflow": 50, "in_use": 90, "overflow": 40})
    assert pool.utilisation_pct == 90.0 and pool.status == "WARN"
    assert parse_pool_health({"size": 5, "max_overflow": 5, "in_use": 1, "overflow": 0, "utilisation_pct": 10,
                              "status": "ok"}).status == "OK"
    jobs = parse_jobs({"runs": [
        {"job": "nightly", "status": "failed", "started_at": "2026-11-27T03:00:00+00:00", "detail": "boom"},
        {"job": "nightly", "status": "succeeded", "started_at": "2026-11-26T03:00:00Z"},
        {"job": "partitions", "status": "running", "started_at": None},
        {"no": "job"},
    ]})
    assert jobs["nightly"].status == "failed" and jobs["nightly"].detail == "boom"
    assert jobs["partitions"].status == "running" and "reconcile" not in jobs
    fleet = parse_fleet({"total": 10, "online": 7, "battery": {"critical": 1, "low": 2, "high": 7}})
    assert (fleet.offline, fleet.low_battery) == (3, 3)


def _call(url: str, method: str = "GET", body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_poller_against_a_real_server(live_server):
    admin = {"x-admin": live_server.admin_key}
    enrolled = _call(live_server.admin_url + "/v1/devices/enroll", "POST",
                     {"devices": [{"device_uid": f"con-{i}"} for i in range(5)]}, admin)["devices"]
    poller = ServerPoller(ApiClient(live_server.admin_url, live_server.admin_key))
    first = poller.poll()
    for dev in enrolled[:3]:
        _call(live_server.url + "/v1/heartbeat", "POST", heartbeat_body(battery_pct=5),
              {"Authorization": f"Bearer {dev['token']}"})
    # each worker serves its cached summary while it recomputes (stale-while-revalidate): poll on
    deadline = time.monotonic() + 15
    while True:
        time.sleep(0.5)
        second = poller.poll()
        fleet = second.fleet.value
        counts = None if fleet is None else (fleet.total, fleet.online, fleet.low_battery)
        if counts == (5, 3, 3) or time.monotonic() > deadline:
            break
    assert first.status == second.status == "ok"
    assert counts == (5, 3, 3)
    # endpoints that other parts add: data when they are there, "unavailable" (not a crash) when not
    for reading in (second.pool, second.jobs, second.traffic):
        assert reading.ok or reading.kind == UNAVAILABLE, reading
    if second.traffic.ok:
        # rates are deltas between two consecutive polls: send one heartbeat between two polls
        _call(live_server.url + "/v1/heartbeat", "POST", heartbeat_body(),
              {"Authorization": f"Bearer {enrolled[3]['token']}"})
        third = poller.poll()
        assert third.traffic.value.heartbeats_per_s > 0 and third.traffic.value.p50_ms is not None


def test_poller_reports_a_wrong_key_and_a_server_that_is_down(live_server):
    wrong = ServerPoller(ApiClient(live_server.admin_url, "not-the-key")).poll()
    assert wrong.status == AUTH and "403" in wrong.message and wrong.fleet.kind == AUTH
    started = time.monotonic()
    down = ServerPoller(ApiClient(f"http://127.0.0.1:{free_port()}", "k")).poll()
    assert down.status == DOWN and "refused" in down.message and down.pool.kind == down.fleet.kind == DOWN
    assert time.monotonic() - started < 2.0


def test_simulator_process_reports_a_failing_command(tmp_path):
    events = []
    from console.sources.simulator import SimulatorProcess

    sim = SimulatorProcess(events.append, url="http://127.0.0.1:9", admin_key="secret", output_dir=tmp_path,
                           command=[sys.executable, "-c", "import sys; print('{\"t_s\": 1, \"sent\": 2}'); "
                                    "sys.stderr.write('cannot reach server\\n'); sys.exit(2)"])
    shown = sim.start(SimParams.parse("1", "1", "1", "0"))
    assert "secret" not in " ".join(shown) and "--progress-jsonl" in shown
    assert sim.wait(10) == 2
    assert isinstance(events[0], SimProgress) and events[0].sent == 2
    exited = events[-1]
    assert isinstance(exited, SimExited) and exited.returncode == 2 and "cannot reach server" in exited.stderr_tail
