"""The console app: composes the panels, polls the server in a worker (the next poll is scheduled
only when the last one has finished), runs the simulator as a child process and shows its stream.

Worker threads never touch widgets: they post the small messages below, and the handlers, on the
app's own thread, update the history and hand the panels their new snapshots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.markup import escape
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import Button, Footer, Header, Input, Label, RichLog

from console.sources.history import History
from console.sources.http import AUTH, DOWN, ApiClient, EndpointError
from console.sources.local_server import LocalServer, is_local_url
from console.sources.server import JOBS, Reading, ServerPoller, ServerSnapshot, run_job
from console.sources.simulator import (
    DEFAULT_COMMAND,
    SimEvent,
    SimExited,
    SimOutput,
    SimProgress,
    SimReport,
    SimulatorProcess,
)
from console.widgets.events import feed_markup
from console.widgets.jobs import JobsPanel
from console.widgets.latency import LatencyChart
from console.widgets.pool import PoolPanel
from console.widgets.simulator import FAILED, FINISHED, RUNNING, STOPPING, SimulatorPanel, SimView
from console.widgets.traffic import TrafficPanel


@dataclass
class ServerPolled(Message):
    """A poll finished (posted from the poll worker)."""

    snapshot: ServerSnapshot


@dataclass
class SimulatorEvent(Message):
    """A line of the simulator's stream, or its exit (posted from the reader thread)."""

    event: SimEvent


@dataclass
class JobFinished(Message):
    """A job the operator started has answered (posted from its worker)."""

    job: str
    ok: bool
    detail: str


@dataclass
class LocalServerChanged(Message):
    """The local server is up, or failed to start (posted from its worker)."""

    ok: bool
    detail: str


class StartServerScreen(ModalScreen[bool]):
    """Asks whether to start a local server when none answers."""

    BINDINGS = [Binding("y", "answer(True)", "Start it"), Binding("n,escape", "answer(False)", "No")]
    DEFAULT_CSS = """
    StartServerScreen { align: center middle; }
    StartServerScreen > Vertical {
        width: 64; height: auto; border: thick $warning; background: $surface; padding: 1 2;
    }
    StartServerScreen Horizontal { height: auto; margin-top: 1; align-horizontal: center; }
    StartServerScreen Button { margin: 0 2; }
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__()
        self.url = url
        self.reason = reason

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"No NexMDM server answers at {self.url}\n({self.reason}).\n\n"
                        "Start a local one (python -m api serve: embedded PostgreSQL, migrations, "
                        "gunicorn)? It stops when the console exits.")
            with Horizontal():
                yield Button("Start it [y]", id="yes", variant="primary", compact=True)
                yield Button("No [n]", id="no", compact=True)

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class AdminKeyScreen(ModalScreen[str | None]):
    """Asks for the operator key (x-admin) after the server rejected the one in use."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    AUTO_FOCUS = "Input"
    DEFAULT_CSS = """
    AdminKeyScreen { align: center middle; }
    AdminKeyScreen > Vertical {
        width: 64; height: auto; border: thick $accent; background: $surface; padding: 1 2;
    }
    AdminKeyScreen Input { margin-top: 1; }
    """

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Admin key (x-admin header). Enter to use it, Escape to cancel.")
            yield Input(password=True, id="admin-key")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConsoleApp(App[None]):
    """NexMDM operator console."""

    TITLE = "NexMDM console"
    AUTO_FOCUS = None  # letters are bindings until the operator clicks or tabs into an input
    CSS = """
    #body { height: 1fr; }
    #left, #right { width: 1fr; }
    #left { min-width: 36; }
    .panel { border: round $primary-darken-1; border-title-color: $accent; border-title-style: bold;
             padding: 0 1; }
    PoolPanel { height: 1fr; min-height: 5; }
    TrafficPanel { height: 5; }
    JobsPanel { height: 5; border-subtitle-color: $text-muted; }
    #events { height: 1fr; min-height: 3; scrollbar-size-vertical: 1; overflow-x: hidden; }
    LatencyChart { height: 1fr; min-height: 7; }
    SimulatorPanel { height: auto; min-height: 7; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("r", "refresh", "Poll"),
        Binding("p", "run_job('partitions')", "Partitions"),
        Binding("n", "run_job('nightly')", "Nightly"),
        Binding("c", "run_job('reconcile')", "Reconcile"),
        Binding("s", "start_simulator", "Run sim"),
        Binding("x", "stop_simulator", "Stop sim"),
        Binding("k", "enter_admin_key", "Key"),
        Binding("escape", "blur", "Leave input", show=False),
    ]

    def __init__(
        self,
        url: str,
        admin_key: str | None,
        *,
        device_url: str | None = None,
        poll_interval_s: float = 1.0,
        output_dir: Path,
        simulator_command: list[str] | tuple[str, ...] = DEFAULT_COMMAND,
        admin_key_file: Path | None = None,
        local_server_env: dict[str, str] | None = None,
        offer_local_server: bool = True,
        autopoll: bool = True,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__()
        self.url = url.rstrip("/")  # the operator plane
        self.device_url = (device_url or url).rstrip("/")  # the device plane (the simulator's --url)
        self.client = ApiClient(self.url, admin_key)
        self.poller = ServerPoller(self.client)
        self.poll_interval_s = poll_interval_s
        self.output_dir = output_dir
        self.admin_key_file = admin_key_file
        self.local_server_env = local_server_env
        self.offer_local_server = offer_local_server
        self.autopoll = autopoll
        self.clock = clock
        self.history = History()
        self.snapshot: ServerSnapshot | None = None
        self.sim = SimulatorProcess(
            lambda event: self.post_message(SimulatorEvent(event)),
            url=self.device_url, admin_url=self.url, admin_key=admin_key, output_dir=output_dir,
            command=simulator_command,
        )
        self.sim_view = SimView()
        self.local_server: LocalServer | None = None
        self.polls = 0
        self._polling = False
        self._poll_timer: Timer | None = None
        self._offered = False
        self._starting_local = False
        self._pending_jobs: set[str] = set()
        self._last_status: str | None = None
        self._exiting = False

    # ---- layout ---------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(icon="◉")
        with Horizontal(id="body"):
            with Vertical(id="left"):
                yield self._panel(PoolPanel(id="pool"), "Pool")
                yield self._panel(TrafficPanel(id="traffic"), "Traffic · fleet")
                yield self._panel(JobsPanel(id="jobs"), "Jobs")
                yield self._panel(RichLog(id="events", markup=True, wrap=True, max_lines=500, min_width=20), "Events")
            with Vertical(id="right"):
                yield self._panel(LatencyChart(id="latency"), "Heartbeat latency")
                yield self._panel(SimulatorPanel(id="simulator"), "Simulator")
        yield Footer(show_command_palette=False, compact=True)

    @staticmethod
    def _panel(widget: Any, title: str) -> Any:
        widget.add_class("panel")
        widget.border_title = title
        return widget

    def on_mount(self) -> None:
        self.sub_title = self.url
        self.log_event(f"console for {self.url}; polling every {self.poll_interval_s:g} s")
        if self.autopoll:
            self.start_poll()

    def log_event(self, text: str, style: str = "", at: datetime | None = None) -> None:
        """Add a line to the Events panel, time-stamped with ``at`` or the app's clock."""
        stamp = (at or self.clock()).astimezone(UTC).strftime("%H:%M:%S")
        body = f"[{style}]{escape(text)}[/]" if style else escape(text)
        self.query_one("#events", RichLog).write(f"[dim]{stamp}[/] {body}")

    # ---- polling --------------------------------------------------------------------------

    def start_poll(self) -> None:
        """Run one poll in a worker, unless one is running (polls never pile up)."""
        if self._polling:
            return
        if self._poll_timer is not None:
            self._poll_timer.stop()
            self._poll_timer = None
        self._polling = True
        self.run_worker(self._poll, thread=True, group="poll", exit_on_error=False)

    def _poll(self) -> None:
        try:
            snapshot = self.poller.poll()
        except Exception as exc:  # noqa: BLE001 - a bug in a poll must show, not kill the console
            broken: Reading[Any] = Reading(kind="error", message=f"poll failed: {exc!r}")
            snapshot = ServerSnapshot(datetime.now(UTC), 0.0, "error", broken.message, broken, broken, broken, broken)
        self.post_message(ServerPolled(snapshot))

    def on_server_polled(self, message: ServerPolled) -> None:
        self._polling = False
        self.polls += 1
        try:
            self.show_snapshot(message.snapshot)
        finally:
            if self.autopoll:
                self._poll_timer = self.set_timer(self.poll_interval_s, self.start_poll)

    def show_snapshot(self, snap: ServerSnapshot) -> None:
        """Record one poll's result and hand the panels their new data."""
        self.snapshot = snap
        self.history.add_server(snap)
        self.query_one(PoolPanel).reading = snap.pool
        self.query_one(PoolPanel).series = tuple(self.history.pool_pct)
        traffic = self.query_one(TrafficPanel)
        traffic.traffic = snap.traffic
        traffic.fleet = snap.fleet
        jobs = self.query_one(JobsPanel)
        jobs.now = snap.polled_at
        jobs.reading = snap.jobs
        jobs.pending = frozenset(self._pending_jobs)
        self._show_latency()
        for line in snap.feed:
            self.log_event(*feed_markup(line), at=line.at)
        if snap.status != self._last_status:
            self._status_changed(snap)
        self._last_status = snap.status
        state = {"ok": "connected", DOWN: "SERVER DOWN", AUTH: "ADMIN KEY REJECTED"}.get(snap.status, snap.status)
        self.sub_title = f"{self.url} · {state}"

    def _status_changed(self, snap: ServerSnapshot) -> None:
        if snap.status == "ok":
            self.log_event("server answers; admin key accepted", "green")
            self._offered = False
            for name, reading in (("pool", snap.pool), ("metrics", snap.traffic), ("jobs", snap.jobs)):
                if not reading.ok and reading.message and reading.kind != "ok":
                    self.log_event(f"{name}: {reading.message}", "yellow")
        elif snap.status == AUTH:
            self.log_event(f"{snap.message} — press k to enter the key", "bold red")
            self.notify(f"{snap.message}\nPress k to enter the key.", title="Admin key rejected", severity="error")
        elif snap.status == DOWN:
            self.log_event(snap.message, "bold red")
            self._maybe_offer_local_server(snap.message)
        else:
            self.log_event(snap.message, "red")

    def _show_latency(self) -> None:
        chart = self.query_one(LatencyChart)
        server = [p for p in self.history.server_latency]
        if any(p.p50_ms is not None for p in server):
            chart.border_title = "Latency · server /metrics"
            chart.points = tuple(server)
            return
        if self.history.sim_latency:
            chart.border_title = "Latency · simulator (client)"
            chart.points = tuple(self.history.sim_latency)
            return
        chart.border_title = "Heartbeat latency"
        snap = self.snapshot
        if snap is not None and not snap.traffic.ok and snap.traffic.message:
            chart.note = f"/metrics: {snap.traffic.message}"
        elif snap is not None:
            chart.note = "no heartbeats measured yet"
        chart.points = ()

    def action_refresh(self) -> None:
        """Poll now (and offer a local server again if none answers)."""
        self._offered = False
        self.start_poll()

    def action_enter_admin_key(self) -> None:
        """Ask for the admin key and use it from the next poll on (also for the simulator)."""

        def entered(key: str | None) -> None:
            if key:
                self.client.admin_key = self.sim.admin_key = key
                self.log_event("using the admin key entered", "cyan")
                self.start_poll()

        self.push_screen(AdminKeyScreen(), entered)

    # ---- local server ---------------------------------------------------------------------

    def _maybe_offer_local_server(self, reason: str) -> None:
        if (self._offered or self._starting_local or not self.offer_local_server
                or not is_local_url(self.url) or (self.local_server and self.local_server.running)):
            return
        self._offered = True

        def answered(start: bool | None) -> None:
            if start:
                self.start_local_server()
            else:
                self.log_event("not starting a local server; still polling ([r] asks again)", "dim")

        self.push_screen(StartServerScreen(self.url, reason), answered)

    def start_local_server(self) -> None:
        """Start ``python -m api serve`` on the URL's port in a worker."""
        if self._starting_local:
            return
        self._starting_local = True
        self.local_server = LocalServer(
            self.url, self.output_dir / "local-server.log", device_url=self.device_url,
            admin_key=self.client.admin_key, env=self.local_server_env,
        )
        self.log_event(f"starting a local server (log: {self.local_server.log_path}) …", "cyan")
        self.run_worker(self._start_local, thread=True, group="local", exit_on_error=False)

    def _start_local(self) -> None:
        assert self.local_server is not None
        try:
            self.local_server.start()
        except Exception as exc:  # noqa: BLE001 - shown to the operator
            self.post_message(LocalServerChanged(False, str(exc)))
            return
        self.post_message(LocalServerChanged(True, f"local server ready at {self.url}"))

    def on_local_server_changed(self, message: LocalServerChanged) -> None:
        self._starting_local = False
        if not message.ok:
            self.log_event(f"local server failed: {message.detail}", "bold red")
            self.notify(message.detail[:300], title="Local server failed", severity="error")
            return
        if not self.client.admin_key and self.admin_key_file is not None and self.admin_key_file.exists():
            key = self.admin_key_file.read_text().strip()
            self.client.admin_key = self.sim.admin_key = key
            self.log_event(f"using the development admin key from {self.admin_key_file}")
        self.log_event(message.detail, "green")
        self.start_poll()

    # ---- jobs -----------------------------------------------------------------------------

    def action_run_job(self, job: str) -> None:
        """Run a scheduled job now (POST /ops/<job>) in a worker."""
        if job not in JOBS or job in self._pending_jobs:
            return
        self._pending_jobs.add(job)
        self.query_one(JobsPanel).pending = frozenset(self._pending_jobs)
        self.log_event(f"running {job} now …", "cyan")
        self.run_worker(lambda: self._run_job(job), thread=True, group=f"job-{job}", exit_on_error=False)

    def _run_job(self, job: str) -> None:
        try:
            report = run_job(self.client, job)
        except EndpointError as err:
            self.post_message(JobFinished(job, False, err.message))
        except Exception as exc:  # noqa: BLE001 - shown to the operator
            self.post_message(JobFinished(job, False, repr(exc)))
        else:
            self.post_message(JobFinished(job, True, _summarise(report)))

    def on_job_finished(self, message: JobFinished) -> None:
        self._pending_jobs.discard(message.job)
        self.query_one(JobsPanel).pending = frozenset(self._pending_jobs)
        if message.ok:
            self.log_event(f"{message.job}: {message.detail}", "green")
        else:
            self.log_event(f"{message.job} failed: {message.detail}", "bold red")
            self.notify(message.detail, title=f"{message.job} failed", severity="error")
        self.start_poll()

    # ---- simulator ------------------------------------------------------------------------

    def action_start_simulator(self) -> None:
        """Start a simulator run with the panel's inputs."""
        panel = self.query_one(SimulatorPanel)
        if self.sim.running:
            self.notify("the simulator is already running; [x] stops it", severity="warning")
            return
        if not self.sim.admin_key:
            message = "no admin key: press k to enter it (the simulator enrolls its devices with it)"
            self._show_sim(SimView(state=FAILED, message=message))
            self.notify(message, title="Simulator", severity="error")
            return
        try:
            params = panel.read_params()
        except ValueError as err:
            self._show_sim(SimView(state=FAILED, message=str(err)))
            self.notify(str(err), title="Simulator inputs", severity="error")
            return
        self.history.clear_simulator()
        try:
            argv = self.sim.start(params)
        except (OSError, RuntimeError) as err:
            self._show_sim(SimView(state=FAILED, params=params, message=f"could not start: {err}"))
            return
        self.log_event(
            f"simulator: {params.devices:,} devices for {params.duration_s:g} s, every {params.interval_s:g} s "
            f"± {params.jitter_s:g} s (≈ {params.rate_per_s:,.0f}/s); log {self.sim.log_path}", "cyan")
        self.log.info(f"simulator command: {' '.join(argv)}")
        self._show_sim(SimView(state=RUNNING, params=params, message=f"{params.rate_per_s:,.0f} heartbeats/s planned"))
        self.set_focus(None)

    def action_stop_simulator(self) -> None:
        """Stop the run: SIGINT, so it still checks for loss and writes its report."""
        if not self.sim.running:
            self.notify("the simulator is not running", severity="information")
            return
        self.sim.stop()
        self.log_event("simulator: stopping (SIGINT; it finishes its report) …", "yellow")
        self._show_sim(_replace(self.sim_view, state=STOPPING))

    def on_simulator_event(self, message: SimulatorEvent) -> None:
        event = message.event
        view = self.sim_view
        if isinstance(event, SimProgress):
            self.history.add_simulator(event)
            self._show_sim(_replace(view, progress=event, message=""))
            self._show_latency()
        elif isinstance(event, SimReport):
            path = str(self.sim.report_path) if self.sim.report_path else None
            self._show_sim(_replace(view, verdict=event.verdict, passed=event.passed, report_path=path))
            self.log_event(f"simulator verdict: {event.verdict}; report {path}", "green" if event.passed else "red")
        elif isinstance(event, SimExited):
            self._simulator_exited(event)
        elif isinstance(event, SimOutput):
            self.log_event(f"simulator: {event.text}", "dim")

    def _simulator_exited(self, event: SimExited) -> None:
        view = self.sim_view
        report = view.report_path
        if report is None and self.sim.report_path is not None and self.sim.report_path.exists():
            report = str(self.sim.report_path)
        if event.returncode in (0, 1) or (event.stopped and report):
            passed = view.passed if view.passed is not None else event.returncode == 0
            verdict = view.verdict or ("PASS" if passed else "FAIL")
            how = "stopped" if event.stopped else "ended"
            self._show_sim(_replace(view, state=FINISHED, verdict=verdict, passed=passed, report_path=report,
                                    message=f"{how}, exit {event.returncode}"))
            self.log_event(f"simulator {how} (exit {event.returncode}), verdict {verdict}",
                           "green" if passed else "red")
        else:
            detail = event.stderr_tail.splitlines()[-1] if event.stderr_tail else "no output"
            self._show_sim(_replace(view, state=FAILED, report_path=report,
                                    message=f"exit {event.returncode}: {detail}"))
            self.log_event(f"simulator failed (exit {event.returncode}): {event.stderr_tail or 'no output'}"
                           f" — log {event.log_path}", "bold red")
            self.notify(detail[:300], title="Simulator failed", severity="error")

    def _show_sim(self, view: SimView) -> None:
        self.sim_view = view
        self.query_one(SimulatorPanel).view = view

    def action_blur(self) -> None:
        self.set_focus(None)

    # ---- exit -----------------------------------------------------------------------------

    def action_quit(self) -> None:
        """Quit; first stop the simulator and the local server, showing that it is happening."""
        busy = self.sim.running or (self.local_server is not None and self.local_server.running)
        if not busy or self._exiting:
            self.exit()  # a second q does not wait (on_unmount still stops the children)
            return
        self._exiting = True
        self.log_event("stopping the simulator and the local server before exit …", "yellow")
        self.notify("Stopping the simulator and the local server…", timeout=60)
        self.run_worker(self._stop_and_exit, thread=True, group="exit", exit_on_error=False)

    def _stop_and_exit(self) -> None:
        try:
            self.stop_children()
        finally:
            self.call_from_thread(self.exit)

    def stop_children(self, timeout_s: float = 30.0) -> None:
        """Stop the simulator (SIGINT, waiting for its report) and the local server. Idempotent."""
        if self.sim.running:
            self.sim.stop()
            if self.sim.wait(timeout_s) is None and self.sim.proc is not None:
                self.sim.proc.kill()
                self.sim.proc.wait()
        if self.local_server is not None:
            self.local_server.stop()

    def on_unmount(self) -> None:
        self.stop_children()


def _replace(view: SimView, **changes: Any) -> SimView:
    return replace(view, **changes)


def _summarise(report: Any) -> str:
    """A job's answer in one line: status, rows, duration, and its detail."""
    if not isinstance(report, dict):
        return str(report)[:200]
    parts = [str(report.get("status", "done"))]
    if report.get("rows_affected") is not None:
        parts.append(f"{report['rows_affected']} rows")
    if report.get("duration_s") is not None:
        parts.append(f"{report['duration_s']} s")
    detail = report.get("detail")
    if isinstance(detail, dict):
        parts += [f"{k}={v}" for k, v in detail.items() if not isinstance(v, dict | list)][:4]
    elif detail:
        parts.append(str(detail)[:120])
    return ", ".join(parts)
