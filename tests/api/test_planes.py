"""Two planes, one codebase: the device plane serves what devices call, the operator plane the
rest; asking one for the other's endpoint names the right plane; ``python -m api serve`` runs
both, restarts a crashed one, and stops both together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from api.app import create_app
from config.settings import Settings
from tests.conftest import ADMIN_KEY
from tests.support.helpers import heartbeat_body
from tests.support.live import ROOT, call, free_port, start_server

DEVICE_ONLY = [("POST", "/v1/heartbeat")]
OPERATOR_ONLY = [
    ("POST", "/v1/devices/enroll"), ("GET", "/v1/devices/1"), ("GET", "/v1/devices"), ("GET", "/v1/fleet/summary"),
    ("GET", "/v1/devices/1/heartbeats"), ("GET", "/metrics"), ("GET", "/ops/pool_health"), ("GET", "/ops/jobs"),
    ("POST", "/ops/reconcile"), ("GET", "/openapi.json"), ("POST", "/v1/devices/1/revoke"),
]


def plane_client(settings: Settings, engine, plane: str):
    app = create_app(settings.with_overrides(plane=plane), engine=engine)
    app.testing = True
    return app.test_client()


def test_each_plane_serves_its_own_endpoints_and_names_the_other_plane(settings, engine, admin):
    device = plane_client(settings, engine, "device")
    operator = plane_client(settings, engine, "operator")
    for method, path in OPERATOR_ONLY:
        resp = device.open(path, method=method, headers=admin, json={} if method == "POST" else None)
        body = resp.get_json()
        assert resp.status_code == 404 and body["error"] == "wrong_plane", (method, path, body)
        assert "operator plane (ADMIN_HOST:ADMIN_PORT)" in body["detail"], body
        served = operator.open(path, method=method, headers=admin, json={} if method == "POST" else None)
        assert served.status_code != 404 or served.get_json()["error"] == "device_not_found", (path, served.data)
    resp = operator.post("/v1/heartbeat", json=heartbeat_body(), headers={"Authorization": "Bearer x"})
    assert resp.status_code == 404 and resp.get_json()["error"] == "wrong_plane"
    assert "device plane (HOST:PORT)" in resp.get_json()["detail"]
    assert device.post("/v1/heartbeat", json=heartbeat_body(), headers={"Authorization": "Bearer x"}).status_code == 401
    for client in (device, operator):  # both have their own liveness and readiness
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        unknown = client.get("/v1/nothing-here")
        assert unknown.status_code == 404 and unknown.get_json()["error"] == "not_found"
    # A wrong method on a plane's own path stays a 405, not a wrong-plane 404.
    assert device.get("/v1/heartbeat").status_code == 405


def test_the_device_plane_runs_no_jobs(database_url, engine, tmp_path):
    """Two device workers and one operator worker: the scheduler starts once, in the operator
    plane (the single-plane layout starts it in every worker)."""
    server = start_server(database_url, ADMIN_KEY, tmp_path, workers=2)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "scheduler started" not in server.log():
            time.sleep(0.1)
        time.sleep(0.5)
        started = [line for line in server.log().splitlines() if "scheduler started" in line]
        assert len(started) == 1, server.log()[-3000:]
        assert call(server.url + "/ops/jobs", headers={"x-admin": ADMIN_KEY})[1]["error"] == "wrong_plane"
        assert call(server.admin_url + "/ops/jobs", headers={"x-admin": ADMIN_KEY})[0] == 200
    finally:
        server.stop()


def _masters(launcher: psutil.Process) -> dict[str, psutil.Process]:
    """The launcher's gunicorn masters, by the plane each serves."""
    out = {}
    for child in launcher.children():
        try:
            plane = child.environ().get("PLANE")
        except psutil.Error:
            continue
        if plane:
            out[plane] = child
    return out


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_serve_runs_both_planes_restarts_a_crashed_one_and_stops_both(database_url, engine, tmp_path: Path):
    port, admin_port = free_port(), free_port()
    device_url, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    env = dict(os.environ, DATABASE_URL=database_url, ADMIN_KEY=ADMIN_KEY, PORT=str(port), ADMIN_PORT=str(admin_port),
               WEB_CONCURRENCY="1", VAR_DIR=str(tmp_path), SCHEDULER_ENABLED="false")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the launcher's default: VAR_DIR/prometheus, emptied
    log = (tmp_path / "serve.log").open("wb")
    launcher = subprocess.Popen([sys.executable, "-m", "api", "serve"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    proc = psutil.Process(launcher.pid)
    try:
        _wait(lambda: _answers(device_url) and _answers(admin_url), 60, "both planes")
        masters = _masters(proc)
        assert set(masters) == {"device", "operator"}
        for plane, url in (("device", device_url), ("operator", admin_url)):
            victim = masters[plane]
            other_url = admin_url if plane == "device" else device_url
            for p in [victim, *victim.children()]:  # the whole plane dies, as an OOM kill of it would
                p.send_signal(signal.SIGKILL)
            psutil.wait_procs([victim], timeout=10)
            assert _answers(other_url)  # the other plane never stopped
            _wait(lambda plane=plane, old=victim.pid: plane in _masters(proc) and _masters(proc)[plane].pid != old,
                  15, f"a new {plane} plane")
            _wait(lambda url=url: _answers(url), 30, f"the {plane} plane answering again")
        assert "the device plane exited" in (tmp_path / "serve.log").read_text()

        masters = _masters(proc)
        everything = [proc, *proc.children(recursive=True)]
        launcher.send_signal(signal.SIGINT)  # Ctrl-C
        assert launcher.wait(timeout=40) == 0
        gone, alive = psutil.wait_procs(everything, timeout=10)
        assert not alive, alive
        assert not _answers(device_url) and not _answers(admin_url)
    finally:
        if launcher.poll() is None:
            for p in [proc, *proc.children(recursive=True)]:
                p.send_signal(signal.SIGKILL)
            launcher.wait()
