"""console.sources: plain Python (no Textual), parsing, percentiles, and polls of a real server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from api import contract
from config.settings import PROJECT_ROOT
from console.sources.http import AUTH, DOWN, ERROR, ApiClient
from console.sources.metrics import bucket_delta, diff_metrics, parse_metrics, quantile
from console.sources.server import ServerPoller, parse_fleet, parse_jobs, parse_pool_health
from console.sources.simulator import SimExited, SimOutput, SimParams, SimProgress, SimReport, live_verdict, parse_line
from tests.console.scenes import metrics_text
from tests.support.helpers import bearer, heartbeat_body
from tests.support.live import free_port


def test_sources_import_no_textual_and_no_flask():
    code = (
        "import sys, pkgutil, importlib, console.sources as s\n"
        "for m in pkgutil.iter_modules(s.__path__): importlib.import_module('console.sources.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('textual', 'flask'))\n"
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
        '# TYPE nexmdm_heartbeat_write_duration_seconds histogram\n'
        'nexmdm_heartbeat_write_duration_seconds_bucket{le="0.01",worker="a"} 1000\n'
        'nexmdm_heartbeat_write_duration_seconds_bucket{le="0.5",worker="a"} 1000\n'
        'nexmdm_heartbeat_write_duration_seconds_bucket{le="+Inf",worker="a"} 1000\n'
        'nexmdm_heartbeat_write_duration_seconds_count{worker="a"} 1000\n'
        '# TYPE nexmdm_heartbeats_accepted_total counter\nnexmdm_heartbeats_accepted_total 1000\n'
        '# TYPE nexmdm_heartbeats_rejected_total counter\nnexmdm_heartbeats_rejected_total{reason="x"} 0\n',
        10.0,
    )
    # 100 new observations, all slow, split over two label sets: the old fast ones must not dilute them
    second = parse_metrics(
        '# TYPE nexmdm_heartbeat_write_duration_seconds histogram\n'
        'nexmdm_heartbeat_write_duration_seconds_bucket{le="0.01",worker="a"} 1000\n'
        'nexmdm_heartbeat_write_duration_seconds_bucket{le="0.5",worker="a"} 1050\n'
        'nexmdm_heartbeat_write_duration_seconds_bucket{le="+Inf",worker="a"} 1050\n'
        'nexmdm_heartbeat_write_duration_seconds_bucket{le="0.01",worker="b"} 0\n'
        'nexmdm_heartbeat_write_duration_seconds_bucket{le="0.5",worker="b"} 50\n'
        'nexmdm_heartbeat_write_duration_seconds_bucket{le="+Inf",worker="b"} 50\n'
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


def test_a_counter_reset_is_tolerated_and_a_page_without_the_metrics_is_not():
    assert bucket_delta(((0.1, 10.0), (float("inf"), 20.0)), ((0.1, 1.0), (float("inf"), 2.0))) == (
        (0.1, 1.0), (float("inf"), 2.0))
    for page in ("# nothing here\n", ""):
        with pytest.raises(ValueError, match="lacks"):
            parse_metrics(page, 1.0)


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
    report = parse_line('{"type": "report", "verdict": "PASS", "summary": "ALL SLI TARGETS MET"}')
    assert isinstance(report, SimReport) and report.passed is True and report.verdict == "PASS"
    failed = parse_line('{"type": "report", "verdict": "FAIL", "failed": ["heartbeat p99"]}')
    assert isinstance(failed, SimReport) and failed.passed is False
    # one spelling: a report line in another shape is shown as it came, not guessed at
    assert isinstance(parse_line('{"type": "report", "verdict": "ALL SLI TARGETS MET"}'), SimOutput)
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


POOL_FIGURES = {"workers": 2, "pool_size": 100, "max_overflow": 100, "capacity": 200, "in_use": 3, "overflow": 0,
                "utilization_pct": 1.5, "busiest_worker_utilization_pct": 2.0}
POOL_HEALTH = {
    **POOL_FIGURES, "planes": {"all": POOL_FIGURES}, "pool": POOL_FIGURES, "status": "WARN",
    "reasons": ["WARN: the pools of all workers may open 200"], "postgres": None, "postgres_error": "down",
    "postgres_cpu": None, "postgres_cpu_note": None, "warn_pct": 80.0, "critical_pct": 95.0,
    "as_of": "2026-11-27T12:00:00Z",
}
JOB_RUNS = {"runs": [
    {"run_id": 3, "job": "reconcile", "status": "succeeded", "trigger": "api",
     "started_at": "2026-11-27T12:00:00+00:00", "finished_at": "2026-11-27T12:00:01+00:00", "duration_s": 1.0,
     "rows_affected": 0, "detail": {"healed": 0, "checked": 10}, "error": None},
    {"run_id": 2, "job": "nightly", "status": "failed", "trigger": "schedule", "detail": {"archived": 0},
     "error": "checksum mismatch\ntraceback…", "started_at": "2026-11-27T03:00:00+00:00",
     "finished_at": None, "duration_s": None, "rows_affected": None},
    {"run_id": 1, "job": "nightly", "status": "succeeded", "trigger": "schedule", "detail": {},
     "error": None, "started_at": "2026-11-26T03:00:00Z", "finished_at": None, "duration_s": None,
     "rows_affected": None},
]}
FLEET = {"total": 10, "online": 7, "offline": 3, "never_seen": 0, "revoked": 0, "charging": 1,
         "offline_over_1h": 2, "offline_over_24h": 1, "battery": {"critical": 1, "low": 2, "medium": 0, "high": 7},
         "app_versions": {"1.0": 10}, "as_of": "2026-11-27T12:00:00Z", "source": "primary", "replica_lag_s": None}


def test_payloads_in_the_servers_shapes_are_decoded():
    pool = parse_pool_health(POOL_HEALTH)
    assert (pool.pool_size, pool.capacity, pool.utilization_pct, pool.status) == (100, 200, 1.5, "WARN")
    assert pool.reasons[0].startswith("WARN: the pools")
    jobs = parse_jobs(JOB_RUNS)
    assert jobs["reconcile"].detail == "healed=0, checked=10" and jobs["nightly"].detail == "checksum mismatch"
    assert jobs["nightly"].status == "failed" and "partitions" not in jobs  # the latest run of each job
    fleet = parse_fleet(FLEET)
    assert (fleet.total, fleet.offline, fleet.low_battery) == (10, 3, 3)
    sample = parse_metrics(metrics_text(10), 1.0)
    assert sample.latency_buckets[-1] == (float("inf"), 2000.0) and sample.acked_total == 2000


def _without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


@pytest.mark.parametrize(("decode", "body"), [
    # the guesses the console used to make: another spelling of a field, or a field left out
    (parse_pool_health, {**_without(POOL_HEALTH, "pool_size"), "size": 100}),
    (parse_pool_health, {**_without(POOL_HEALTH, "utilization_pct"), "utilisation_pct": 1.5}),
    (parse_pool_health, {**POOL_HEALTH, "status": "ok"}),
    (parse_jobs, {"jobs": JOB_RUNS["runs"]}),
    (parse_jobs, JOB_RUNS["runs"]),
    (parse_jobs, {"runs": [_without(JOB_RUNS["runs"][0], "started_at")]}),
    (parse_fleet, _without(FLEET, "offline")),
], ids=["size", "utilisation_pct", "lowercase-status", "jobs-key", "bare-list", "no-started_at", "no-offline"])
def test_an_answer_that_breaks_the_servers_schema_is_an_error(decode, body):
    with pytest.raises(ValueError):
        decode(body)


class PagesClient:
    """Answers the poller's GET requests from a dict of pages."""

    def __init__(self, pages: dict[str, str]) -> None:
        self.pages = pages

    def get_text(self, path: str) -> str:
        return self.pages[path]


def test_a_metrics_page_without_the_servers_heartbeat_metrics_is_an_error():
    renamed = metrics_text(10).replace(contract.HEARTBEAT_WRITE_SECONDS, "nexmdm_heartbeat_write_seconds")
    with pytest.raises(ValueError, match=contract.HEARTBEAT_WRITE_SECONDS):
        parse_metrics(renamed, 1.0)
    poller = ServerPoller(PagesClient({"/metrics": renamed}), feeds=[])
    reading = poller._read(poller._scrape)
    assert reading.kind == ERROR and "unreadable answer" in reading.message


def test_the_console_decodes_what_the_app_answers(client, admin):
    """Each endpoint the console polls, answered by the real app and decoded by the console."""
    enrolled = client.post("/v1/devices/enroll", json={"devices": [{"device_uid": f"dec-{i}"} for i in range(3)]},
                           headers=admin).get_json()["devices"]
    for dev in enrolled[:2]:
        answer = client.post("/v1/heartbeat", json=heartbeat_body(battery_pct=5), headers=bearer(dev["token"]))
        assert answer.status_code == 200, answer.get_json()
    assert client.post("/ops/partitions", headers=admin).status_code == 200

    def get(path: str):
        answer = client.get(path, headers=admin)
        assert answer.status_code == 200, (path, answer.get_data(as_text=True)[:300])
        return answer

    fleet = parse_fleet(get("/v1/fleet/summary").get_json())
    assert (fleet.total, fleet.online, fleet.low_battery) == (3, 2, 2)
    pool = parse_pool_health(get("/ops/pool_health").get_json())
    assert pool.status in ("OK", "WARN", "CRITICAL") and pool.capacity == 10 and pool.pool.capacity == 10
    jobs = parse_jobs(get("/ops/jobs?limit=100").get_json())
    assert jobs["partitions"].status == "succeeded"
    first = parse_metrics(get("/metrics").get_data(as_text=True), 1.0)
    answer = client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(enrolled[2]["token"]))
    assert answer.status_code == 200
    second = parse_metrics(get("/metrics").get_data(as_text=True), 2.0)
    traffic = diff_metrics(first, second)
    assert traffic is not None and traffic.observations == 1 and traffic.heartbeats_per_s == pytest.approx(1.0)


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
    # every endpoint answers in the shape the console decodes: a broken one fails here
    for reading in (second.pool, second.jobs, second.traffic):
        assert reading.ok, reading
    assert second.pool.value.status in ("OK", "WARN", "CRITICAL") and second.pool.value.capacity > 0
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
