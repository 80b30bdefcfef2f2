"""Traffic and fleet panel: heartbeats/s and error rate (server metrics), fleet counts."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from console.sources.metrics import Traffic
from console.sources.server import FleetSummary, Reading
from console.sources.simulator import ERROR_TARGET_PCT
from console.widgets.format import count, unavailable


def traffic_line(reading: Reading[Traffic] | None) -> Text:
    """Heartbeats acknowledged per second and the error rate, or why they are not known."""
    if reading is None:
        return unavailable("traffic: waiting for the first poll…")
    if not reading.ok or reading.value is None:
        return unavailable(f"traffic: {reading.message or 'unavailable'}")
    traffic = reading.value
    line = Text.assemble(("heartbeats ", "dim"), (f"{count(traffic.heartbeats_per_s)}/s", "bold"))
    line.append("  err ", style="dim")
    if traffic.error_pct is None:
        line.append("—")
    else:
        style = "bold red" if traffic.error_pct >= ERROR_TARGET_PCT else "bold green"
        line.append(f"{traffic.error_pct:.2f}%", style=style)
        line.append(f" ({traffic.errors_per_s or 0:,.1f}/s)", style="dim")
    return line


def fleet_lines(reading: Reading[FleetSummary] | None) -> list[Text]:
    """Fleet counts: total, online, offline, low battery, the most common app version."""
    if reading is None:
        return [unavailable("fleet: waiting for the first poll…")]
    if not reading.ok or reading.value is None:
        return [unavailable(f"fleet: {reading.message or 'unavailable'}")]
    fleet = reading.value
    first = Text.assemble(
        ("online ", "dim"), (count(fleet.online), "bold green"), (f"/{count(fleet.total)}", "bold"),
        ("  offline ", "dim"), (count(fleet.offline), "bold yellow" if fleet.offline else "bold"),
    )
    low_style = "bold red" if fleet.low_battery else "bold"
    second = Text.assemble(("low battery ", "dim"), (count(fleet.low_battery), low_style))
    if fleet.app_versions:
        version, n = max(fleet.app_versions.items(), key=lambda kv: (kv[1], kv[0]))
        share = 100.0 * n / fleet.total if fleet.total else 0.0
        second.append("  top ", style="dim")
        second.append(f"{version} ({share:.0f}%)", style="bold")
    return [first, second]


class TrafficPanel(Widget):
    """Shows ``traffic`` (from /metrics deltas) and ``fleet`` (/v1/fleet/summary)."""

    traffic: reactive[Reading[Traffic] | None] = reactive(None, always_update=True)
    fleet: reactive[Reading[FleetSummary] | None] = reactive(None, always_update=True)

    def render(self) -> RenderableType:
        width = max(10, self.content_size.width)
        lines = [traffic_line(self.traffic), *fleet_lines(self.fleet)]
        for line in lines:
            line.no_wrap = True
            line.truncate(width, overflow="ellipsis")
        return Group(*lines)
