"""``--outage-pct/--outage-at``: the simulator silences a share of the fleet and checks that the
server (its events job running every second here) raised exactly those offline events, and the
online events when they returned; an outage too short for the server to notice fails the check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.conftest import ADMIN_KEY
from tests.simulator.test_simulator import LOOSE_LATENCY, simulator
from tests.support.live import start_server

FAST_EVENTS = {"OFFLINE_AFTER_SECONDS": "4", "EVENTS_INTERVAL_S": "1", "DEDUP_BUCKET_SECONDS": "1"}


@pytest.mark.slow  # two simulator runs of 16 s and 8 s: a drill, in make test-faults
def test_outage_is_reported_exactly_and_a_missed_one_fails(database_url: str, engine: Engine, tmp_path: Path):
    server = start_server(database_url, ADMIN_KEY, tmp_path, workers=1, **FAST_EVENTS)
    try:
        common = ("--devices", "40", "--interval", "1.5", "--jitter", "0.2", "--flaky-pct", "0",
                  "--admin-key", ADMIN_KEY, "--url", server.url, "--admin-url", server.admin_url,
                  "--token-cache", str(tmp_path / "tokens.json"),
                  "--outage-pct", "10", "--outage-at", "3", "--outage-grace", "5", "--quiet", *LOOSE_LATENCY)
        out = tmp_path / "outage.json"
        proc = simulator(*common, "--duration", "16", "--outage-for", "8", "--output", str(out))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outage = json.loads(out.read_text())["outage"]
        assert outage["exact"] and (outage["silenced"], outage["offline_events"], outage["online_events"]) == (4, 4, 4)
        assert "server raised exactly the 4 offline events" in proc.stdout
        with engine.connect() as conn:
            offline = conn.exec_driver_sql("SELECT count(DISTINCT device_id) FROM events "
                                           "WHERE type = 'device_offline'").scalar_one()
        assert offline >= 4  # the four, then the whole fleet once the run ended

        # One second of silence is shorter than OFFLINE_AFTER_SECONDS: no offline event can come.
        missed = tmp_path / "missed.json"
        proc = simulator(*common, "--duration", "8", "--outage-for", "1", "--output", str(missed))
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        report = json.loads(missed.read_text())
        assert not report["outage"]["exact"] and len(report["outage"]["missing_offline"]) == 4
        assert report["verdict"] == "FAIL" and "outage events" in report["failed"]
        assert "MISMATCH: 4 silenced without device_offline" in proc.stdout
    finally:
        server.stop()
