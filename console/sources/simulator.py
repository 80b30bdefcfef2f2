"""The simulator as a child process: start it with the operator's inputs, read its
``--progress-jsonl`` stream (one JSON object a second, then a ``"type": "report"`` line), stop it
with SIGINT so it still writes its report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from api import contract
from config.settings import PROJECT_ROOT

DEFAULT_COMMAND = (sys.executable, "-m", "simulator")
P95_TARGET_MS = contract.HEARTBEAT_P95_MS
P99_TARGET_MS = contract.HEARTBEAT_P99_MS
ERROR_TARGET_PCT = contract.ERROR_PCT


@dataclass(frozen=True)
class SimParams:
    """What the operator asked for."""

    devices: int
    duration_s: float
    interval_s: float
    jitter_s: float

    @classmethod
    def parse(cls, devices: str, duration_s: str, interval_s: str, jitter_s: str) -> SimParams:
        """Parse the console's inputs; ValueError names the field that is wrong."""
        values: list[float] = []
        for name, raw, minimum in (
            ("devices", devices, 1), ("duration", duration_s, 0.001), ("interval", interval_s, 0.001),
            ("jitter", jitter_s, 0),
        ):
            try:
                value = float(raw.strip())
            except ValueError:
                raise ValueError(f"{name}: {raw.strip() or 'empty'} is not a number") from None
            if value < minimum:
                raise ValueError(f"{name}: must be at least {minimum:g}")
            values.append(value)
        if values[0] != int(values[0]):
            raise ValueError("devices: must be a whole number")
        if values[3] >= values[2]:
            raise ValueError("jitter: must be smaller than the interval")
        return cls(int(values[0]), values[1], values[2], values[3])

    def args(self) -> list[str]:
        """The simulator's command-line arguments for these inputs."""
        return [
            "--devices", str(self.devices), "--duration", f"{self.duration_s:g}",
            "--interval", f"{self.interval_s:g}", "--jitter", f"{self.jitter_s:g}",
        ]

    @property
    def rate_per_s(self) -> float:
        """Heartbeats per second this fleet sends once ramped up."""
        return self.devices / self.interval_s


@dataclass(frozen=True)
class SimProgress:
    """One line of the simulator's progress stream."""

    t_s: float
    sent: int
    acked: int
    errors: int
    rate_per_s: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    error_rate_pct: float | None = None  # the simulator's own figure, when it sends one
    verdict_so_far: str | None = None  # PASS / FAIL, when the simulator judges as it goes
    failing: tuple[str, ...] = ()

    @property
    def error_pct(self) -> float:
        """Errors as a share of requests, in % (the simulator's figure, else errors / sent)."""
        if self.error_rate_pct is not None:
            return self.error_rate_pct
        return 100.0 * self.errors / self.sent if self.sent else 0.0


@dataclass(frozen=True)
class SimReport:
    """The simulator's last line: what it concluded (the report itself is in SimulatorProcess.report_path)."""

    verdict: str
    passed: bool
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SimExited:
    """The simulator process ended (exit 0: SLIs held, 1: one failed, 2: usage or connection)."""

    returncode: int
    stderr_tail: str
    log_path: str
    stopped: bool  # the operator stopped it


@dataclass(frozen=True)
class SimOutput:
    """A line of the stream that is not a snapshot (shown as is)."""

    text: str


SimEvent = SimProgress | SimReport | SimExited | SimOutput


def _num(raw: Any) -> float | None:
    try:
        return None if raw is None else float(raw)
    except (TypeError, ValueError):
        return None


def parse_line(line: str) -> SimEvent | None:
    """One line of ``--progress-jsonl`` output → an event; None for a blank line."""
    text = line.strip()
    if not text:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return SimOutput(text)
    if not isinstance(obj, dict):
        return SimOutput(text)
    if obj.get("type") == "report":
        verdict = obj.get("verdict")  # PASS or FAIL, as simulator/report.py and its capacity search write it
        if verdict not in ("PASS", "FAIL"):
            return SimOutput(text)  # not the simulator's report: shown as it came
        return SimReport(verdict, verdict == "PASS", obj)
    return SimProgress(
        t_s=_num(obj.get("t_s")) or 0.0,
        sent=int(_num(obj.get("sent")) or 0),
        acked=int(_num(obj.get("acked")) or 0),
        errors=int(_num(obj.get("errors")) or 0),
        rate_per_s=_num(obj.get("rate_per_s")),
        p50_ms=_num(obj.get("p50_ms")),
        p95_ms=_num(obj.get("p95_ms")),
        p99_ms=_num(obj.get("p99_ms")),
        p999_ms=_num(obj.get("p999_ms")),
        error_rate_pct=_num(obj.get("error_rate_pct")),
        verdict_so_far=str(obj["verdict_so_far"]) if obj.get("verdict_so_far") is not None else None,
        failing=tuple(str(f) for f in obj.get("failing") or () if f),
    )


def live_verdict(progress: SimProgress) -> tuple[bool | None, str]:
    """The SLIs as they stand so far: the simulator's own verdict when it sends one, else p95 < 150 ms,
    p99 < 300 ms and errors < 0.5 % judged here; None = no data yet."""
    if progress.sent == 0 or progress.p95_ms is None:
        return None, "no data yet"
    if progress.verdict_so_far is not None:
        if progress.verdict_so_far.upper() == "PASS":
            return True, "SLIs holding"
        return False, "FAILING: " + (", ".join(progress.failing) or progress.verdict_so_far)
    failing = []
    if progress.p95_ms >= P95_TARGET_MS:
        failing.append(f"p95 {progress.p95_ms:.0f}≥{P95_TARGET_MS:.0f}")
    if progress.p99_ms is not None and progress.p99_ms >= P99_TARGET_MS:
        failing.append(f"p99 {progress.p99_ms:.0f}≥{P99_TARGET_MS:.0f}")
    if progress.error_pct >= ERROR_TARGET_PCT:
        failing.append(f"errors {progress.error_pct:.2f}%")
    return (False, "FAILING: " + ", ".join(failing)) if failing else (True, "SLIs holding")


class SimulatorProcess:
    """One simulator run at a time, as a child process in its own session (its own process
    group), so stopping it signals it and whatever it started, and nothing else."""

    def __init__(
        self,
        on_event: Callable[[SimEvent], None],
        *,
        url: str,
        admin_key: str | None,
        output_dir: Path,
        admin_url: str | None = None,
        command: Sequence[str] = DEFAULT_COMMAND,
        stop_grace_s: float = 60.0,
    ) -> None:
        self._on_event = on_event
        self.url = url  # the device plane
        self.admin_url = admin_url or url  # the operator plane
        self.admin_key = admin_key
        self.output_dir = output_dir
        self.command = list(command)
        self.stop_grace_s = stop_grace_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.report_path: Path | None = None
        self.log_path: Path | None = None
        self._stopped = False
        self._reader: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """True while the process lives."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, params: SimParams) -> list[str]:
        """Start a run; returns its command line (without the admin key). Raises OSError/RuntimeError."""
        if self.running:
            raise RuntimeError("the simulator is already running")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.report_path = self.output_dir / f"sim-{stamp}.json"
        self.log_path = self.output_dir / f"sim-{stamp}.log"
        argv = [*self.command, *params.args(), "--url", self.url, "--admin-url", self.admin_url,
                "--output", str(self.report_path), "--progress-jsonl"]
        shown = list(argv)
        if self.admin_key:
            argv += [f"--admin-key={self.admin_key}"]
            shown += ["--admin-key", "***"]
        self._stopped = False
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), name="simulator-reader", daemon=True)
        self._reader.start()
        return shown

    def stop(self) -> None:
        """SIGINT the run (it finishes and writes its report); SIGTERM after stop_grace_s, then
        SIGKILL. Returns at once."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self._stopped = True
        self._signal(proc, signal.SIGINT)
        threading.Thread(target=self._escalate, args=(proc,), name="simulator-stop", daemon=True).start()

    def wait(self, timeout_s: float) -> int | None:
        """Wait for the process and its stream to end; its exit code, or None on timeout."""
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        if self._reader is not None:
            self._reader.join(timeout=timeout_s)
        return code

    def _escalate(self, proc: subprocess.Popen[bytes]) -> None:
        for sig, wait_s in ((signal.SIGTERM, self.stop_grace_s), (signal.SIGKILL, 10.0)):
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                self._signal(proc, sig)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # its own group (start_new_session): the run and its children
        except ProcessLookupError:
            pass

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            event = parse_line(raw.decode("utf-8", "replace"))
            if event is not None:
                self._emit(event)
        code = proc.wait()
        tail = ""
        if self.log_path is not None and self.log_path.exists():
            tail = "\n".join(self.log_path.read_text(errors="replace").strip().splitlines()[-5:])
        self._emit(SimExited(code, tail, str(self.log_path), self._stopped))

    def _emit(self, event: SimEvent) -> None:
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001 - a listener's failure must not kill the reader
            pass
