"""Simulator panel: the run's inputs, and its state — live p95/p99 and SLI verdict while it runs,
the verdict and report path when it ends."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Input, Label

from console.sources.simulator import ERROR_TARGET_PCT, SimParams, SimProgress, live_verdict
from console.widgets.format import count, ms

IDLE, RUNNING, STOPPING, FINISHED, FAILED = "idle", "running", "stopping", "finished", "failed"


@dataclass(frozen=True)
class SimView:
    """What the panel shows about the current or last run."""

    state: str = IDLE
    params: SimParams | None = None
    progress: SimProgress | None = None
    verdict: str | None = None  # the report's verdict, once there is one
    passed: bool | None = None
    report_path: str | None = None
    message: str = ""


class SimStatus(Widget):
    """The run's state lines; takes ``view``."""

    view: reactive[SimView] = reactive(SimView, always_update=True, layout=True)

    def render(self) -> RenderableType:
        v = self.view
        width = max(20, self.content_size.width)
        style = {RUNNING: "bold cyan", STOPPING: "bold yellow", FINISHED: "bold green", FAILED: "bold red"}
        head = Text(f"● {v.state}", style=style.get(v.state, "dim"))
        lines: list[Text] = [head]
        if v.params is not None and v.state != IDLE:
            t = v.progress.t_s if v.progress else 0.0
            head.append(f" {t:.0f}/{v.params.duration_s:g} s", style="bold")
        p = v.progress
        if p is not None:
            head.append(f"  {count(p.rate_per_s)}/s", style="bold")
            head.append("  err ", style="dim")
            head.append(f"{p.error_pct:.2f}%", style="bold red" if p.error_pct >= ERROR_TARGET_PCT else "bold")
            line = Text.assemble(("p95 ", "yellow"), (ms(p.p95_ms), "bold"), ("  p99 ", "red"), (ms(p.p99_ms), "bold"),
                                 (" ms  ", "dim"))
            if v.verdict is None:
                ok, text = live_verdict(p)
                line.append(text, style="green" if ok else "dim" if ok is None else "bold red")
            lines.append(line)
        elif v.state == IDLE:
            head.append("  [s] run  [x] stop", style="dim")
        if v.verdict is not None:
            lines.append(Text.assemble(("verdict ", "dim"), (v.verdict, "bold green" if v.passed else "bold red")))
        if v.report_path:
            lines.append(Text.assemble(("report ", "dim"), (v.report_path, "bold")))
        elif p is not None:
            lines.append(Text.assemble(("sent ", "dim"), (count(p.sent), ""), ("  acked ", "dim"), (count(p.acked), ""),
                                       ("  errors ", "dim"), (count(p.errors), "bold red" if p.errors else "")))
        if v.message:
            lines.append(Text(v.message, style="red" if v.state == FAILED else "dim"))
        for line in lines:
            if line is not lines[-1] or not v.report_path:
                line.no_wrap = True
                line.truncate(width, overflow="ellipsis")
        return Group(*lines)


class SimulatorPanel(Vertical):
    """Inputs (devices, duration, interval, jitter) and the run's status; takes ``view``."""

    DEFAULT_CSS = """
    SimulatorPanel { height: auto; }
    SimulatorPanel Horizontal { height: 1; }
    SimulatorPanel Label { width: auto; padding: 0 1 0 0; color: $text-muted; }
    SimulatorPanel Input { width: 1fr; max-width: 10; margin: 0 2 0 0; }
    SimulatorPanel SimStatus { height: auto; min-height: 2; }
    """

    def __init__(self, devices: int = 200, duration_s: float = 30, interval_s: float = 1,
                 jitter_s: float = 0.25, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._defaults = (str(devices), f"{duration_s:g}", f"{interval_s:g}", f"{jitter_s:g}")

    def compose(self) -> ComposeResult:
        devices, duration, interval, jitter = self._defaults
        with Horizontal():
            yield Label("devices")
            yield Input(devices, id="sim-devices", compact=True, type="integer")
            yield Label("duration s")
            yield Input(duration, id="sim-duration", compact=True, type="number")
        with Horizontal():
            yield Label("interval s")
            yield Input(interval, id="sim-interval", compact=True, type="number")
            yield Label("jitter s")
            yield Input(jitter, id="sim-jitter", compact=True, type="number")
        yield SimStatus()

    def read_params(self) -> SimParams:
        """The inputs as SimParams; ValueError says which one is wrong."""
        return SimParams.parse(*(self.query_one(f"#sim-{name}", Input).value
                                 for name in ("devices", "duration", "interval", "jitter")))

    view: reactive[SimView] = reactive(SimView, always_update=True)

    def watch_view(self, view: SimView) -> None:
        if self.is_mounted:
            self.query_one(SimStatus).view = view

    def on_mount(self) -> None:
        self.query_one(SimStatus).view = self.view
