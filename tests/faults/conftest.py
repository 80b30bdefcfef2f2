"""Fixtures of the fault and overload scenarios: real gunicorn servers on real PostgreSQL,
started and stopped by PID (workers included), an enrolled fleet, and the closing table."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY
from tests.faults.loadgen import Device
from tests.faults.report import ROWS, render
from tests.support.live import LiveServer, start_server, stop_server


@pytest.fixture
def fault_servers(database_url: str, engine, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start servers (``start(workers=2, port=None, **env)``); all are stopped afterwards."""
    started: list[LiveServer] = []

    def start(workers: int = 2, port: int | None = None, **env: str) -> LiveServer:
        server = start_server(database_url, ADMIN_KEY, tmp_path, workers=workers, port=port, **env)
        started.append(server)
        return server

    yield start
    for server in started:
        stop_server(server)


def enroll_fleet(server: LiveServer, n: int, prefix: str = "fault") -> list[Device]:
    """Enroll ``n`` devices through the API and return their ids and tokens."""
    body = json.dumps({"devices": [{"device_uid": f"{prefix}-{i}"} for i in range(n)]}).encode()
    req = urllib.request.Request(
        server.admin_url + "/v1/devices/enroll", data=body, method="POST",
        headers={"Content-Type": "application/json", "x-admin": server.admin_key},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return [Device(d["id"], d["token"]) for d in json.loads(resp.read())["devices"]]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if ROWS:
        terminalreporter.section("fault and overload scenarios")
        terminalreporter.write_line(render(ROWS))
        terminalreporter.write_line(
            "recovery: from the fault's end (worker or server killed, database back, load dropped) "
            "to the service answering again"
        )
