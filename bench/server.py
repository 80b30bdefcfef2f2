"""Start and stop the real service for a benchmark, exactly as ``make run`` does."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BenchServer:
    url: str  # the device plane
    admin_key: str
    proc: subprocess.Popen
    var_dir: Path
    admin_url: str = ""  # the operator plane ("" = url: one plane)

    def __post_init__(self) -> None:
        self.admin_url = self.admin_url or self.url

    def processes(self) -> dict[str, list[psutil.Process]]:
        """The server's processes, by role: gunicorn (API) and postgres (database)."""
        api = [psutil.Process(self.proc.pid)]
        api += [p for p in api[0].children(recursive=True) if "postgres" not in p.name()]
        db = []
        pid_file = self.var_dir / "pg" / "postmaster.pid"
        if pid_file.exists():
            postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
            db = [postmaster, *postmaster.children(recursive=True)]
        return {"api": api, "db": db}

    def workers(self, plane: str | None = None) -> list[psutil.Process]:
        """The gunicorn worker processes (children of each plane's arbiter, the launcher's
        children), of one plane (device, operator, all) or of every plane."""
        launcher = psutil.Process(self.proc.pid)
        out = []
        for arbiter in launcher.children():
            if "postgres" in arbiter.name():
                continue
            try:
                arbiter_plane = arbiter.environ().get("PLANE")
            except psutil.Error:
                continue
            if plane is None or arbiter_plane == plane:
                out += arbiter.children()
        return out

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) used so far by each role, children included."""
        totals = {}
        for role, procs in self.processes().items():
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            totals[role] = total
        return totals

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the machine is shared: no fixed port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(var_dir: Path, port: int | None = None, workers: int = 2, split: bool = True,
          admin_port: int | None = None, **env: str) -> BenchServer:
    """``python -m api serve`` with its own embedded cluster under ``var_dir``: the device plane
    on ``port`` and the operator plane on ``admin_port``, or one plane serving both (free ports
    unless given)."""
    port = port or free_port()
    admin_port = admin_port or free_port()
    var_dir.mkdir(parents=True, exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ADMIN_KEY")}
    # Time is compressed in the bench (a device sends every few seconds, not every minute), so
    # the per-device limit (DEVICE_MAX_PER_MINUTE, 30 by default) is lifted: 0 = no limit.
    environ.update(VAR_DIR=str(var_dir), PORT=str(port), HOST="127.0.0.1", WEB_CONCURRENCY=str(workers),
                   ADMIN_HOST="127.0.0.1", ADMIN_PORT=str(admin_port), SPLIT_PLANES="true" if split else "false",
                   DEVICE_MAX_PER_MINUTE="0")
    environ.update(env)
    log = (var_dir / "server.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "api", "serve"], cwd=ROOT, env=environ,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    admin_url = f"http://127.0.0.1:{admin_port}" if split else url
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {var_dir / 'server.log'}")
        try:
            if all(_ready(u) for u in {url, admin_url}):
                key = (var_dir / "admin_key").read_text().strip()
                return BenchServer(url, key, proc, var_dir, admin_url)
        except OSError:
            pass
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    raise RuntimeError("server did not become ready in 90 s")


def _ready(url: str) -> bool:
    with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
        return resp.status == 200


def enroll_devices(server: BenchServer, n: int, prefix: str, batch: int = 5000) -> list[dict]:
    """Enroll ``n`` devices through the API in batches, with progress; returns id/token pairs."""
    out: list[dict] = []
    started = time.perf_counter()
    for first in range(0, n, batch):
        devices = [{"device_uid": f"{prefix}-{i}"} for i in range(first, min(n, first + batch))]
        req = urllib.request.Request(
            server.admin_url + "/v1/devices/enroll", data=json.dumps({"devices": devices}).encode(), method="POST",
            headers={"Content-Type": "application/json", "x-admin": server.admin_key},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            out += json.loads(resp.read())["devices"]
        print(f"\r  enrolled {len(out):>7,}/{n:,} devices ({time.perf_counter() - started:.1f} s)",
              end="", flush=True)
    print(flush=True)
    return out
