"""A local NexMDM server for the console (``python -m api serve``: embedded PostgreSQL, migrations,
gunicorn), started when nothing answers at the URL and stopped, by PID, when the console exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from config.settings import PROJECT_ROOT

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def is_local_url(url: str) -> bool:
    """True when the URL points at this machine (only then can the console start a server)."""
    return (urlsplit(url).hostname or "") in LOCAL_HOSTS


def _local_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.hostname not in LOCAL_HOSTS:
        raise ValueError(f"{url} is not on this machine")
    return ("127.0.0.1" if parts.hostname == "localhost" else parts.hostname), parts.port or 80


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/readyz", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class LocalServer:
    """``python -m api serve`` as a child process: its operator plane on ``url``'s host and port,
    its device plane on ``device_url``'s (the same URL: one gunicorn serving both planes)."""

    def __init__(self, url: str, log_path: Path, *, admin_key: str | None = None,
                 env: dict[str, str] | None = None, device_url: str | None = None) -> None:
        self.url = url
        self.admin_host, self.admin_port = _local_address(url)
        self.host, self.port = _local_address(device_url or url)
        self.log_path = log_path
        self.admin_key = admin_key
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """True while the launcher process lives."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start it and wait until both planes' /readyz answer 200. RuntimeError (with the log's tail) if not."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HOST=self.host, PORT=str(self.port), ADMIN_HOST=self.admin_host,
                   ADMIN_PORT=str(self.admin_port), **self.extra_env)
        if (self.host, self.port) == (self.admin_host, self.admin_port):
            env["SPLIT_PLANES"] = "false"
        if self.admin_key:
            env["ADMIN_KEY"] = self.admin_key
        # The console's simulator runs at compressed time (a device every few seconds): a local
        # development server lifts the per-device limit unless the environment sets one.
        env.setdefault("DEVICE_MAX_PER_MINUTE", "0")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "api", "serve"], cwd=PROJECT_ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"local server exited ({self.proc.returncode}): {self.log_tail()}")
            if all(_ready(url) for url in {self.url, f"http://{self.host}:{self.port}"}):
                return  # both planes
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"local server not ready within {timeout_s:g} s: {self.log_tail()}")

    def stop(self, timeout_s: float = 40.0) -> int | None:
        """SIGTERM (the launcher stops gunicorn, then its database); SIGKILL if it hangs."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of its log."""
        if not self.log_path.exists():
            return ""
        return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
