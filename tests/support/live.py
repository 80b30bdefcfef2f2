"""A real NexMDM server for integration tests: the device plane and the operator plane, each a
gunicorn with gevent workers exactly as ``make run`` starts them, stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from api.metrics import PREFIX, live_gauge_values, prepare_multiproc_dir
from api.supervisor import gunicorn_command

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    """``url``/``proc``: the device plane (or both planes when not split); ``admin_url``/
    ``admin_proc``: the operator plane (the same as the former when not split)."""

    url: str
    admin_key: str
    proc: subprocess.Popen
    log_path: Path
    metrics_dir: Path
    admin_url: str = ""
    admin_proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.admin_url = self.admin_url or self.url

    def stop(self) -> None:
        procs = [p for p in (self.proc, self.admin_proc) if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def live_workers(metrics_dir: Path) -> int:
    """Workers whose app is built, as the server's own worker gauge counts them."""
    return int(live_gauge_values(metrics_dir).get(f"{PREFIX}_worker_processes", 0))


def start_server(
    database_url: str, admin_key: str, tmp: Path, workers: int = 2, port: int | None = None,
    split: bool = True, admin_workers: int = 1, **env: str,
) -> LiveServer:
    """Start the planes as ``make run`` does (same config file, one gunicorn per plane) on free
    ports (or ``port`` for the device plane); ``split=False``: one gunicorn serving both."""
    port = port or free_port()
    admin_port = free_port() if split else port
    # Set and wiped as the launcher (python -m api serve) does.
    metrics_dir = prepare_multiproc_dir(Path(env.pop("PROMETHEUS_MULTIPROC_DIR", tmp / f"prometheus-{port}")))
    environ = dict(
        os.environ,
        DATABASE_URL=database_url,
        ADMIN_KEY=admin_key,
        HOST="127.0.0.1",
        PORT=str(port),
        WEB_CONCURRENCY=str(workers),
        ADMIN_HOST="127.0.0.1",
        ADMIN_PORT=str(admin_port),
        ADMIN_CONCURRENCY=str(admin_workers),
        SPLIT_PLANES="true" if split else "false",
        VAR_DIR=str(tmp),
        ARCHIVE_DIR=str(tmp / "archive"),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        # Webhooks registered by a test (the fuzzer's arbitrary URLs among them) are sent only
        # where a test asks for it, to its own receiver on 127.0.0.1.
        WEBHOOKS_ENABLED="false",
        # Load at compressed time (many heartbeats per device a minute) and tests of bad input;
        # the limits have their own tests, which pass their own values.
        DEVICE_MAX_PER_MINUTE="0",
        AUTH_FAILURE_LIMIT="0",
    )
    environ.update(env)  # a test's own settings win (e.g. ARCHIVE_DIR)
    log_path = tmp / f"server-{port}.log"
    handle = log_path.open("ab")

    def spawn(plane: str) -> subprocess.Popen:
        return subprocess.Popen(gunicorn_command(), cwd=ROOT, env=dict(environ, PLANE=plane),
                                stdout=handle, stderr=subprocess.STDOUT)

    proc = spawn("device" if split else "all")
    server = LiveServer(f"http://127.0.0.1:{port}", admin_key, proc, log_path, metrics_dir)
    if split:
        server.admin_proc = spawn("operator")
        server.admin_url = f"http://127.0.0.1:{admin_port}"
    expected = workers + (admin_workers if split else 0)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None or (server.admin_proc is not None and server.admin_proc.poll() is not None):
                raise RuntimeError(f"server exited: {server.log()[-3000:]}")
            try:
                # Ready when both planes answer and every worker has booted (each writes its
                # live gauges on start).
                if (_ready(server.url) and _ready(server.admin_url)
                        and live_workers(metrics_dir) >= expected):
                    return server
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready: {server.log()[-3000:]}")
    except BaseException:  # never leave a server behind (the caller gets no handle to stop it)
        server.stop()
        raise


def _ready(url: str) -> bool:
    with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
        return resp.status == 200


def call(url: str, method: str = "GET", body=None, headers=None) -> tuple[int, dict]:
    """One JSON request; (status, decoded body), error answers included."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def kill_server(server: LiveServer) -> None:
    """SIGKILL the gunicorn master and every worker, as a crash of the whole server would."""
    try:
        procs = [psutil.Process(server.proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    server.proc.wait(timeout=10)


def stop_server(server: LiveServer) -> None:
    """Stop a server by PID; SIGKILL what is left of it (workers included)."""
    try:
        children = psutil.Process(server.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    server.stop()
    for child in children:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
