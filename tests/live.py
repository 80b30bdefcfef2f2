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


def start_server(database_url: str, admin_key: str, tmp: Path, workers: int = 2, **env: str) -> LiveServer:
    """Start gunicorn exactly as ``make run`` does (same config file), on a free port."""
    port = free_port()
    environ = dict(
        os.environ,
        DATABASE_URL=database_url,
        ADMIN_KEY=admin_key,
        HOST="127.0.0.1",
        PORT=str(port),
        WEB_CONCURRENCY=str(workers),
        VAR_DIR=str(tmp),
        ARCHIVE_DIR=str(tmp / "archive"),
        **env,
    )
    log_path = tmp / f"server-{port}.log"
    handle = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "config" / "gunicorn.conf.py"), "wsgi:app"],
        cwd=ROOT, env=environ, stdout=handle, stderr=subprocess.STDOUT,
    )
    server = LiveServer(f"http://127.0.0.1:{port}", admin_key, proc, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {server.log()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not become ready: {server.log()[-3000:]}")
