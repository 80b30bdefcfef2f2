"""Jobs panel: the last run of partitions / nightly / reconcile, its status and age, and the key
that runs it now."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Group, RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from console.sources.server import JOBS, JobRun, Reading
from console.widgets.format import age

JOB_KEYS = {"partitions": "p", "nightly": "n", "reconcile": "c"}
STATUS_STYLE = {"succeeded": "green", "failed": "bold red", "running": "cyan", "skipped": "yellow"}


class JobsPanel(Widget):
    """Shows ``reading`` (latest run per job, from /ops/jobs) as of ``now``; ``pending`` lists
    jobs the operator has just asked to run."""

    reading: reactive[Reading[dict[str, JobRun]] | None] = reactive(None, always_update=True)
    now: reactive[datetime] = reactive(lambda: datetime.now(UTC), always_update=True)
    pending: reactive[frozenset[str]] = reactive(frozenset(), always_update=True)

    def render(self) -> RenderableType:
        reading = self.reading
        note = None
        runs: dict[str, JobRun] = {}
        if reading is None:
            note = "waiting for the first poll…"
        elif not reading.ok or reading.value is None:
            note = reading.message or "unavailable"
        else:
            runs = reading.value
        lines: list[RenderableType] = []
        width = max(20, self.content_size.width)
        for job in JOBS:
            line = Text.assemble((f"[{JOB_KEYS[job]}] ", "bold cyan"), (f"{job:<11}", "bold"), no_wrap=True)
            if job in self.pending:
                line.append("starting…", style="cyan")
            elif note is not None:
                line.append("—", style="dim")
            elif (run := runs.get(job)) is None:
                line.append("never run", style="dim")
            else:
                line.append(f"{run.status:<10}", style=STATUS_STYLE.get(run.status, ""))
                line.append(age(run.finished_at or run.started_at, self.now), style="dim")
                if run.detail and run.status in ("failed", "skipped"):
                    line.append(f" {run.detail}", style="red" if run.status == "failed" else "dim")
            line.truncate(width, overflow="ellipsis")
            lines.append(line)
        return Group(*lines)

    def watch_reading(self, reading: Reading[dict[str, JobRun]] | None) -> None:
        """Why there is nothing to show goes in the bottom border, so the three lines stay put."""
        self.border_subtitle = "" if reading is None or reading.ok else (reading.message or "unavailable")
