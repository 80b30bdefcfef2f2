"""A real NexMDM server (gunicorn, gevent workers) for integration tests, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from api.metrics import PREFIX, live_gauge_values, prepare_multiproc_dir

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    admin_key: str
    proc: subprocess.Popen
    log_path: Path
    metrics_dir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def live_workers(metrics_dir: Path) -> int:
    """Workers whose app is built, as the server's own worker gauge counts them."""
    return int(live_gauge_values(metrics_dir).get(f"{PREFIX}_worker_processes", 0))


def start_server(
    database_url: str, admin_key: str, tmp: Path, workers: int = 2, port: int | None = None, **env: str
) -> LiveServer:
    """Start gunicorn exactly as ``make run`` does (same config file), on a free port (or ``port``)."""
    port = port or free_port()
    # Set and wiped as the launcher (python -m api serve) does.
    metrics_dir = prepare_multiproc_dir(Path(env.pop("PROMETHEUS_MULTIPROC_DIR", tmp / f"prometheus-{port}")))
    environ = dict(
        os.environ,
        DATABASE_URL=database_url,
        ADMIN_KEY=admin_key,
        HOST="127.0.0.1",
        PORT=str(port),
        WEB_CONCURRENCY=str(workers),
        VAR_DIR=str(tmp),
        ARCHIVE_DIR=str(tmp / "archive"),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    environ.update(env)  # a test's own settings win (e.g. ARCHIVE_DIR)
    log_path = tmp / f"server-{port}.log"
    handle = log_path.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "config" / "gunicorn.conf.py"), "wsgi:app"],
        cwd=ROOT, env=environ, stdout=handle, stderr=subprocess.STDOUT,
    )
    server = LiveServer(f"http://127.0.0.1:{port}", admin_key, proc, log_path, metrics_dir)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {server.log()[-3000:]}")
            try:
                with urllib.request.urlopen(server.url + "/readyz", timeout=1) as resp:
                    # Ready when every worker has booted (each writes its live gauges on start).
                    if resp.status == 200 and live_workers(metrics_dir) >= workers:
                        return server
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready: {server.log()[-3000:]}")
    except BaseException:  # never leave a server behind (the caller gets no handle to stop it)
        server.stop()
        raise
