"""The console app driven by Pilot (app.run_test()) against a real server."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from config.settings import PROJECT_ROOT
from console.app import AdminKeyScreen, ConsoleApp, StartServerScreen
from console.sources.local_server import LocalServer
from console.widgets.jobs import JobsPanel
from console.widgets.pool import PoolPanel
from console.widgets.simulator import FINISHED, RUNNING, SimulatorPanel
from console.widgets.traffic import TrafficPanel
from tests.conftest import ADMIN_KEY
from tests.support.helpers import heartbeat_body
from tests.support.live import free_port

SIZE = (100, 32)


def pilot_test(fn):
    """Run an async Pilot scenario as a plain test (no asyncio plugin needed); fixtures still apply."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return run


async def wait_for(pilot, predicate: Callable[[], bool], timeout_s: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def events_text(app: ConsoleApp) -> str:
    """The Events panel as one line (the log wraps long entries)."""
    return " ".join(line.text.strip() for line in app.query_one("#events").lines)


def make_app(url: str, key: str | None, tmp: Path, **kwargs) -> ConsoleApp:
    kwargs.setdefault("offer_local_server", False)
    return ConsoleApp(url, key, poll_interval_s=0.3, output_dir=tmp / "console", **kwargs)


def local_env(database_url: str, tmp: Path) -> dict[str, str]:
    """``python -m api serve`` on the tests' database, one worker, no scheduler."""
    return {"DATABASE_URL": database_url, "VAR_DIR": str(tmp), "WEB_CONCURRENCY": "1",
            "SCHEDULER_ENABLED": "false", "ARCHIVE_DIR": str(tmp / "archive")}


def call(url: str, method: str = "GET", body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pilot_test
async def test_panels_update_from_a_live_server(live_server, tmp_path):
    admin = {"x-admin": live_server.admin_key}
    app = make_app(live_server.admin_url, live_server.admin_key, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        traffic = app.query_one(TrafficPanel)
        await wait_for(pilot, lambda: traffic.fleet is not None and traffic.fleet.ok, what="first fleet summary")
        assert traffic.fleet.value.total == 0
        assert "connected" in app.sub_title
        devices = call(live_server.admin_url + "/v1/devices/enroll", "POST",
                       {"devices": [{"device_uid": f"pilot-{i}"} for i in range(12)]}, admin)["devices"]
        for dev in devices[:8]:
            call(live_server.url + "/v1/heartbeat", "POST", heartbeat_body(),
                 {"Authorization": f"Bearer {dev['token']}"})
        # each server worker recomputes its cached summary in the background; the console polls on
        await wait_for(pilot, lambda: traffic.fleet.value is not None
                       and (traffic.fleet.value.total, traffic.fleet.value.online) == (12, 8),
                       timeout_s=15, what="fleet of 12, 8 online")
        assert traffic.fleet.value.offline == 4
        polls_before = app.polls
        await wait_for(pilot, lambda: app.polls >= polls_before + 2, what="two more polls")
        # every panel's endpoint answers in the shape the console decodes: a broken one fails here
        for reading in (app.query_one(PoolPanel).reading, app.query_one(JobsPanel).reading, traffic.traffic):
            assert reading.ok, reading
        assert "server answers" in events_text(app)


@pilot_test
async def test_polls_never_pile_up_on_a_slow_server(live_server, tmp_path):
    app = make_app(live_server.admin_url, live_server.admin_key, tmp_path)
    calls, overlaps, active = [], [], [0]
    real_poll = app.poller.poll

    def slow_poll():
        active[0] += 1
        overlaps.append(active[0])
        time.sleep(0.5)
        try:
            return real_poll()
        finally:
            active[0] -= 1
            calls.append(time.monotonic())

    app.poller.poll = slow_poll
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(5):
            await pilot.press("r")  # asking for polls while one runs must not start another
            await pilot.pause(0.1)
        await wait_for(pilot, lambda: len(calls) >= 3, what="three polls")
    assert max(overlaps) == 1
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert min(gaps) >= 0.5  # each poll started after the previous one finished


@pilot_test
async def test_wrong_admin_key_shows_and_is_recovered_from(live_server, tmp_path):
    app = make_app(live_server.admin_url, "wrong-key", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "ADMIN KEY REJECTED" in app.sub_title, what="auth error in the header")
        assert "admin key rejected (403)" in events_text(app)
        assert "403" in app.query_one(TrafficPanel).fleet.message
        await pilot.press("k")
        await wait_for(pilot, lambda: isinstance(app.screen, AdminKeyScreen), what="key dialog")
        app.screen.query_one("#admin-key").value = ADMIN_KEY
        await pilot.press("enter")
        await wait_for(pilot, lambda: "connected" in app.sub_title, what="recovery with the right key")
        assert app.query_one(TrafficPanel).fleet.ok


@pilot_test
async def test_server_down_shows_and_the_console_recovers(database_url, engine, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = make_app(url, ADMIN_KEY, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "SERVER DOWN" in app.sub_title, what="server down")
        assert "connection refused" in events_text(app)
        assert app.query_one(PoolPanel).reading.message == "server down"
        # a server comes up at that URL (python -m api serve on the test database), then goes away
        server = LocalServer(url, tmp_path / "server.log", admin_key=ADMIN_KEY, env=local_env(database_url, tmp_path))
        try:
            await asyncio.to_thread(server.start, 60)
            await wait_for(pilot, lambda: "connected" in app.sub_title, timeout_s=10, what="reconnect")
            assert app.query_one(TrafficPanel).fleet.ok
        finally:
            await asyncio.to_thread(server.stop)
        await wait_for(pilot, lambda: "SERVER DOWN" in app.sub_title, timeout_s=10, what="down again")
        assert app.is_running


@pilot_test
async def test_job_keys_post_to_the_server(live_server, tmp_path):
    app = make_app(live_server.admin_url, live_server.admin_key, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.polls >= 1, what="first poll")
        await pilot.press("p")
        await wait_for(pilot, lambda: "partitions:" in events_text(app) or "partitions failed:" in events_text(app),
                       what="the job's answer")
        assert not app.query_one(JobsPanel).pending
        text = events_text(app)
        assert "partitions:" in text and "partitions failed:" not in text


@pilot_test
async def test_offers_a_local_server_when_none_answers_and_stops_it_on_exit(database_url, engine, tmp_path):
    port, device_port = free_port(), free_port()
    env = local_env(database_url, tmp_path)
    app = make_app(f"http://127.0.0.1:{port}", ADMIN_KEY, tmp_path, offer_local_server=True, local_server_env=env,
                   device_url=f"http://127.0.0.1:{device_port}")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, StartServerScreen), what="the offer")
        await pilot.press("y")
        await wait_for(pilot, lambda: "connected" in app.sub_title, timeout_s=60, what="local server")
        local = app.local_server
        assert local is not None and local.running
        assert app.query_one(TrafficPanel).fleet.ok
        # both planes, each on its own port: the console's (operator) and the simulator's (device)
        with urllib.request.urlopen(f"http://127.0.0.1:{device_port}/readyz", timeout=5) as resp:
            assert resp.status == 200
    assert local.proc.poll() is not None  # stopped with the console
    for stopped in (port, device_port):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{stopped}/healthz", timeout=1)


@pilot_test
async def test_declining_the_local_server_keeps_polling(tmp_path):
    app = make_app(f"http://127.0.0.1:{free_port()}", None, tmp_path, offer_local_server=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, StartServerScreen), what="the offer")
        await pilot.press("n")
        await wait_for(pilot, lambda: not isinstance(app.screen, StartServerScreen), what="the offer closed")
        polls = app.polls
        await wait_for(pilot, lambda: app.polls >= polls + 2, what="polling on")
        assert "not starting a local server" in events_text(app) and app.local_server is None
        await pilot.press("s")  # no key: the simulator is not started, and the panel says why
        await pilot.pause()
        assert "no admin key" in app.query_one(SimulatorPanel).view.message and not app.sim.running


@pilot_test
async def test_bad_simulator_inputs_show_in_the_panel(tmp_path):
    app = make_app(f"http://127.0.0.1:{free_port()}", "k", tmp_path, autopoll=False)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one("#sim-jitter").value = "5"
        await pilot.press("s")
        await pilot.pause()
        view = app.query_one(SimulatorPanel).view
        assert view.state == "failed" and "jitter" in view.message
        assert not app.sim.running


@pilot_test
async def test_simulator_run_to_its_end_shows_verdict_and_report(live_server, tmp_path):
    app = make_app(live_server.admin_url, live_server.admin_key, tmp_path, device_url=live_server.url)
    async with app.run_test(size=SIZE) as pilot:
        panel = app.query_one(SimulatorPanel)
        for name, value in (("devices", "40"), ("duration", "3"), ("interval", "1"), ("jitter", "0.2")):
            app.query_one(f"#sim-{name}").value = value
        await pilot.press("s")
        await wait_for(pilot, lambda: panel.view.state in (FINISHED, "failed"), timeout_s=90, what="the run's end")
        view = panel.view
        assert view.state == FINISHED, view
        assert view.progress is not None and view.progress.acked > 0
        assert view.verdict in ("PASS", "FAIL") and view.passed == (view.verdict == "PASS")
        report = json.loads(Path(view.report_path).read_text())
        assert report["verdict"] == view.verdict
        assert "verdict" in events_text(app)


@pilot_test
async def test_simulator_runs_from_the_console_and_stops_with_a_report(live_server, tmp_path):
    app = make_app(live_server.admin_url, live_server.admin_key, tmp_path, device_url=live_server.url)
    async with app.run_test(size=SIZE) as pilot:
        panel = app.query_one(SimulatorPanel)
        for name, value in (("devices", "50"), ("duration", "30"), ("interval", "1"), ("jitter", "0.2")):
            app.query_one(f"#sim-{name}").value = value
        await pilot.press("s")
        await wait_for(pilot, lambda: panel.view.state == RUNNING and panel.view.progress is not None
                       and panel.view.progress.sent > 0, timeout_s=60, what="simulator progress")
        await wait_for(pilot, lambda: panel.view.progress.p95_ms is not None, timeout_s=20, what="live p95")
        assert app.history.sim_latency
        await pilot.press("x")
        await wait_for(pilot, lambda: panel.view.state in (FINISHED, "failed"), timeout_s=90, what="report")
        view = panel.view
        assert view.state == FINISHED, view
        assert view.verdict and view.report_path and Path(view.report_path).exists()
        assert not app.sim.running


def test_the_whole_app_module_stays_importable_without_a_terminal():
    # python -m console --help parses without starting Textual
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "console", "--help"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and "--admin-key" in out.stdout and "--url" in out.stdout

