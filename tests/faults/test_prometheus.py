"""Debian's real Prometheus (2.42) scrapes a live server with the shipped alert rules: the
database goes down and NexmdmDatabaseDown fires while it is down, then clears when it is back.
The rules are loaded as shipped except their ``for:`` durations, cut to seconds (promtool's unit
tests check the durations; this checks the expressions against real scrapes)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from tests.config.test_monitoring import dashboard_expressions
from tests.conftest import ADMIN_KEY
from tests.faults.conftest import enroll_fleet
from tests.support.helpers import heartbeat_body
from tests.support.live import ROOT, free_port, start_server, stop_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus not found: Debian's `prometheus` package, which `make test-faults` installs as root",
    ),
]


def prometheus_get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=5) as resp:
        return json.loads(resp.read())["data"]


def firing(base: str, name: str) -> list[dict]:
    return [a for a in prometheus_get(base, "/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == name and a["state"] == "firing"]


def wait_for(what: str, check, timeout_s: float) -> float:
    """Seconds until ``check()`` is true; fails after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if check():
            return time.monotonic() - started
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout_s} s")


def test_real_prometheus_sees_the_database_down_alert_fire(database_url, engine, pg_cluster, tmp_path: Path):
    rules = re.sub(r"(?m)^(\s+for: )\S+$", r"\g<1>2s", (ROOT / "config/monitoring/alerts.yml").read_text())
    (tmp_path / "alerts.yml").write_text(rules)
    (tmp_path / "key").write_text(ADMIN_KEY)
    server = start_server(database_url, ADMIN_KEY, tmp_path, workers=2)
    config = yaml.safe_load((ROOT / "config/monitoring/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    job = config["scrape_configs"][0]
    job["authorization"]["credentials_file"] = str(tmp_path / "key")
    job["static_configs"] = [{"targets": [server.admin_url.removeprefix("http://")]}]  # /metrics: operator plane
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--log.level=warn"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        def scraped_and_ready() -> bool:
            try:
                result = prometheus_get(base, "/api/v1/query?query=nexmdm_database_up")["result"]
            except OSError:
                return False
            return bool(result) and result[0]["value"][1] == "1"

        wait_for("Prometheus scraping the server", scraped_and_ready, 60)
        # Some traffic for the heartbeat panels, then every panel's query against the real
        # scrapes: each answers something (the 5xx ratio 0, not an empty graph).
        device = enroll_fleet(server, 1, prefix="prom")[0]
        for _ in range(5):
            post = urllib.request.Request(
                server.url + "/v1/heartbeat", data=json.dumps(heartbeat_body(datetime.now(UTC))).encode(),
                headers={"Authorization": f"Bearer {device.token}", "Content-Type": "application/json"},
            )
            urllib.request.urlopen(post, timeout=10).close()
            time.sleep(1.0)
        empty = []
        for expr in dashboard_expressions({"$__rate_interval": "15s", "$__interval": "15s", "$__range": "1m"}):
            if "nexmdm_replica_" in expr:
                continue  # exported only with READ_DATABASE_URL; the panel says it is empty without one
            if not prometheus_get(base, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["result"]:
                empty.append(expr)
        assert not empty, empty
        assert firing(base, "NexmdmDatabaseDown") == []
        assert firing(base, "NexmdmDown") == []
        pg_cluster.stop()
        took_s = wait_for("NexmdmDatabaseDown firing", lambda: bool(firing(base, "NexmdmDatabaseDown")), 30)
        alert = firing(base, "NexmdmDatabaseDown")[0]
        assert alert["annotations"]["runbook_url"].endswith("RUNBOOK.md#the-database-is-unreachable")
        assert firing(base, "NexmdmDown") == []  # the server itself still answers
        pg_cluster.start()
        cleared_s = wait_for("NexmdmDatabaseDown cleared", lambda: not firing(base, "NexmdmDatabaseDown"), 30)
        print(f"NexmdmDatabaseDown fired {took_s:.1f} s after the database stopped "
              f"(for: cut to 2 s, 1 s scrapes); cleared {cleared_s:.1f} s after it was back")
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom.kill()
        log.close()
        if not pg_cluster.running():
            pg_cluster.start()
        engine.dispose()
        stop_server(server)
