"""The alert rules and the Grafana dashboard in config/monitoring/: valid for promtool, tested
with promtool's rule unit tests, and written against metric names the server really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
import yaml

from config.settings import Settings
from tests.conftest import ADMIN_KEY
from tests.support.helpers import heartbeat_body
from tests.support.live import ROOT, call, start_server
from tests.support.metrics_scrape import scrape

MONITORING = ROOT / "config" / "monitoring"
RULES = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
NAME = re.compile(r"\bnexmdm_[A-Za-z0-9_]+")
# Grafana's range variables, as Prometheus would see them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not found: it comes with Debian's `prometheus` package, which `make test` installs "
           "when run as root with apt-get; install it by hand otherwise",
)


def alert_expressions() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"] if "alert" in rule}


def recording_expressions() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"]: rule["expr"] for group in groups for rule in group["rules"] if "record" in rule}


def dashboard_expressions(variables: dict[str, str] = GRAFANA_VARIABLES) -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    out = []
    for expr in exprs:
        for var, value in variables.items():
            expr = expr.replace(var, value)
        out.append(expr)
    return out


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=MONITORING)


@needs_promtool
def test_alert_rules_pass_promtool_check():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_unit_tests_pass():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(dashboard_expressions())
    ]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_required_alerts_and_panels_exist():
    alerts = alert_expressions()
    assert {"NexmdmHeartbeatP95High", "NexmdmHeartbeatP99High", "NexmdmDbPoolUtilizationHigh",
            "NexmdmDbPoolUtilizationCritical", "NexmdmErrorBudgetBurnFast", "NexmdmErrorBudgetBurnSlow",
            "NexmdmJobFailed", "NexmdmJobNotSucceeding", "NexmdmNightlyJobNotSucceeding", "NexmdmDown",
            "NexmdmAbsent", "NexmdmDatabaseDown", "NexmdmPostgresConnectionsLow", "NexmdmIngestQueueBacklog",
            "NexmdmEventLoopLagHigh"} <= set(alerts)
    text = " ".join(dashboard_expressions())
    for signal in ("histogram_quantile(0.95, sum by (le) (rate(nexmdm_heartbeat_write_duration_seconds_bucket",
                   "nexmdm_heartbeats_accepted_total", "nexmdm_heartbeats_rejected_total",
                   "nexmdm_db_pool_utilization_ratio", "nexmdm_job_runs_total",
                   "nexmdm_job_last_success_timestamp_seconds"):
        assert signal in text


def test_every_alert_points_to_a_runbook_section():
    """runbook_url: the configurable base (external label runbook_base) plus an anchor that exists."""
    headings = re.findall(r"^#+ (.+)$", (ROOT / "RUNBOOK.md").read_text(), flags=re.M)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
    base = '{{ or $externalLabels.runbook_base "RUNBOOK.md" }}#'
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue  # a recording rule
            target = rule["annotations"]["runbook_url"]
            assert target.startswith(base) and target[len(base):] in anchors, target
    # Every alert has a promtool unit test.
    tested = set(re.findall(r"alertname: (\w+)", (MONITORING / "alerts_test.yml").read_text()))
    assert set(alert_expressions()) <= tested, set(alert_expressions()) - tested


def test_dashboard_and_alerts_use_only_names_the_server_exports(database_url, engine, tmp_path):
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO job_runs (job, started_at, finished_at, status) "
                             "VALUES ('nightly', now(), now(), 'succeeded')")
    # Two operator-plane workers, so two schedulers race for the start-up partitions run. A read
    # "replica" (the primary itself: the guard finds it is no standby) so the replica series exist.
    server = start_server(database_url, ADMIN_KEY, tmp_path, workers=2, admin_workers=2,
                          READ_DATABASE_URL=database_url)
    try:
        status, body = call(server.admin_url + "/v1/devices/enroll", "POST", {"devices": [{"device_uid": "mon-1"}]},
                            {"x-admin": ADMIN_KEY})
        assert status == 201
        device = body["devices"][0]
        auth = {"Authorization": f"Bearer {device['token']}"}
        assert call(server.url + "/v1/heartbeat", "POST", heartbeat_body(datetime.now(UTC)), auth)[0] == 200
        assert call(server.url + "/v1/heartbeat", "POST", heartbeat_body(battery_pct=-1), auth)[0] == 422
        # Each operator worker's scheduler runs partitions at start-up: one runs, the other skips.
        deadline = time.monotonic() + 20
        while True:
            m = scrape(server.admin_url, ADMIN_KEY)
            runs = {o: m.value("nexmdm_job_runs_total", job_name="partitions", outcome=o)
                    for o in ("succeeded", "skipped", "failed")}
            if sum(runs.values()) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert runs == {"succeeded": 1, "skipped": 1, "failed": 0}, runs
        exported = m.names()
        # Each worker's own process figures, despite multiprocess mode (no process_* series there).
        workers = {p.pid for master in (server.proc, server.admin_proc) for p in psutil.Process(master.pid).children()}
        for name, low in (("nexmdm_process_resident_memory_bytes", 20e6), ("nexmdm_process_cpu_seconds", 0.01),
                          ("nexmdm_process_open_fds", 5)):
            values = {dict(labels)["pid"]: v for (n, labels), v in m.samples.items() if n == name}
            assert set(values) == {str(pid) for pid in workers}, (name, values, workers)
            assert all(v >= low for v in values.values()), (name, values)
        # The shedder of each device-plane worker that has written a heartbeat (its writer
        # starts then), sampled every 2 s: not overloaded, the limit at its ceiling.
        device_workers = {str(p.pid) for p in psutil.Process(server.proc.pid).children()}
        deadline = time.monotonic() + 10
        while not any(n == "nexmdm_ingest_overloaded" for n, _ in m.samples) and time.monotonic() < deadline:
            time.sleep(0.5)
            m = scrape(server.admin_url, ADMIN_KEY)
        for name, expected in (("nexmdm_ingest_overloaded", 0), ("nexmdm_ingest_in_flight", 0),
                               ("nexmdm_ingest_in_flight_limit", Settings().ingest_queue_max)):
            values = {dict(labels)["pid"]: v for (n, labels), v in m.samples.items()
                      if n == name and dict(labels)["plane"] == "device"}
            assert values and set(values) <= device_workers, (name, values, device_workers)
            assert all(dict(labels)["pid"] in device_workers for (n, labels) in m.samples if n == name)
            assert set(values.values()) == {expected}, (name, values)
        waits = [v for (n, _), v in m.samples.items() if n == "nexmdm_ingest_cpu_wait_share"]
        assert waits and all(0 <= v <= 1 for v in waits), waits
        assert m.value("nexmdm_database_up") == 1
        assert 0 < m.value("nexmdm_postgres_connections") < m.value("nexmdm_postgres_connections_limit")
        assert m.value("nexmdm_ingest_queue_capacity") == len(workers) * Settings().ingest_queue_max
    finally:
        server.stop()
    exprs = [*alert_expressions().values(), *recording_expressions().values(), *dashboard_expressions()]
    used = {name for expr in exprs for name in NAME.findall(expr)}
    assert used, "no nexmdm_ metric found in the rules and the dashboard"
    assert used <= exported, f"not exported by the server: {sorted(used - exported)}"


def test_dashboard_draws_its_thresholds_with_one_unit_per_axis():
    """The lines the titles promise are drawn; a panel that mixes units puts the second on its
    own (right) axis; the jobs table is an instant query; the 5xx ratio is 0, not empty."""
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}

    def steps(title: str) -> list[float]:
        defaults = panels[title]["fieldConfig"]["defaults"]
        assert defaults["custom"]["thresholdsStyle"]["mode"] in {"line", "dashed", "area", "line+area"}
        return [s["value"] for s in defaults["thresholds"]["steps"] if s["value"] is not None]

    assert steps("Heartbeat latency (server side)") == [0.15, 0.3]
    assert steps("Pool utilisation (WARN 80 %, CRITICAL 95 %)") == [0.8, 0.95]
    assert steps("Error rates (SLO 0.5 %)") == [0.005]
    for title, panel in panels.items():
        overrides = panel.get("fieldConfig", {}).get("overrides", [])
        second = [o for o in overrides if any(p["id"] == "unit" for p in o["properties"])]
        for override in second:
            assert {"id": "custom.axisPlacement", "value": "right"} in override["properties"], title
        if panel["type"] == "table":
            assert all(t.get("instant") and t.get("format") == "table" for t in panel["targets"]), title
    assert all("or vector(0)" in t["expr"] for t in panels["Error rates (SLO 0.5 %)"]["targets"])
    exprs = " ".join(dashboard_expressions())
    for wanted in ('up{job="nexmdm"}', "nexmdm_token_cache_misses_total", "nexmdm_database_up",
                   "nexmdm_process_resident_memory_bytes", "nexmdm_event_loop_lag_seconds"):
        assert wanted in exprs, wanted
