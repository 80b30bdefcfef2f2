"""The launcher's process supervisor: one gunicorn per plane, restarted when it crashes, all
stopped together.

gunicorn already restarts a plane's crashed *workers*; this restarts a plane's crashed gunicorn
*master* (killed, out of memory), so one plane's crash never takes the other down nor leaves it
running alone for good. A plane that keeps crashing (``max_restarts`` within ``window_s``) stops
everything: a restart loop would only hide the fault.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = ROOT / "config" / "gunicorn.conf.py"


def gunicorn_command() -> list[str]:
    """The command that runs one plane (its PLANE and addresses come from the environment)."""
    return [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "wsgi:app"]


def planes_to_run(split: bool) -> list[str]:
    """The gunicorn processes of a layout: device and operator planes, or one serving both."""
    return ["device", "operator"] if split else ["all"]


@dataclass
class PlaneProcess:
    """One plane's gunicorn master and its recent (re)starts."""

    plane: str
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    starts: list[float] = field(default_factory=list)


class PlaneSupervisor:
    """Runs every plane until asked to stop; restarts one that exits on its own."""

    def __init__(
        self, planes: list[str], env: Mapping[str, str], *, say: Callable[[str], None] = print,
        restart_delay_s: float = 1.0, max_restarts: int = 5, window_s: float = 60.0,
        command: Callable[[], list[str]] = gunicorn_command,
    ) -> None:
        self.planes = [PlaneProcess(p, dict(env, PLANE=p)) for p in planes]
        self.say = say
        self.restart_delay_s = restart_delay_s
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.command = command
        self.stopping = False

    def _spawn(self, plane: PlaneProcess) -> None:
        plane.proc = subprocess.Popen(self.command(), cwd=ROOT, env=plane.env)
        now = time.monotonic()
        plane.starts = [t for t in plane.starts if now - t < self.window_s] + [now]

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every plane (signal handlers call this): SIGTERM, or SIGINT as Ctrl-C would."""
        self.stopping = True
        for plane in self.planes:
            if plane.proc is not None and plane.proc.poll() is None:
                plane.proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    def run(self, poll_s: float = 0.2) -> int:
        """Start every plane and watch them; returns 0 after a requested stop, 1 after giving up."""
        for plane in self.planes:
            self._spawn(plane)
        code = 0
        try:
            while not self.stopping:
                for plane in self.planes:
                    assert plane.proc is not None
                    status = plane.proc.poll()
                    if status is None or self.stopping:
                        continue
                    if len(plane.starts) > self.max_restarts:
                        self.say(f"nexmdm: the {plane.plane} plane exited ({status}) "
                                 f"{len(plane.starts)} times within {self.window_s:g} s; stopping everything")
                        self.stopping, code = True, 1
                        break
                    self.say(f"nexmdm: the {plane.plane} plane exited ({status}); restarting it")
                    time.sleep(self.restart_delay_s)
                    if not self.stopping:
                        self._spawn(plane)
                time.sleep(poll_s)
        finally:
            self.request_stop()
            self._wait_all()
        return code

    def _wait_all(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        for plane in self.planes:
            if plane.proc is None:
                continue
            try:
                plane.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                plane.proc.kill()
                plane.proc.wait()
