"""Latency chart: heartbeat p50/p95/p99/p999 over time in braille dots, the y axis scaled to the
data (10 ms heartbeats fill the chart instead of lying on the floor of a 400 ms axis), the SLO
lines (p95 < 150 ms, p99 < 300 ms) drawn across it when they are in range, and the current
values underneath."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from api.contract import HEARTBEAT_P95_MS, HEARTBEAT_P99_MS
from console.sources.history import LatencyPoint
from console.widgets.format import ms, unavailable

SLO_LINES = ((HEARTBEAT_P99_MS, "red", "p99"), (HEARTBEAT_P95_MS, "yellow", "p95"))
SERIES = (  # drawn in this order: a later series wins a shared cell's colour
    ("p999", "magenta"), ("p99", "red"), ("p95", "yellow"), ("p50", "green"),
)
TARGETS = {"p95": HEARTBEAT_P95_MS, "p99": HEARTBEAT_P99_MS}
_DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # braille bit per (sub-row, sub-col)
_SCALES = (5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000,
           20000, 60000)
LABEL_WIDTH = 5


def y_max(points: list[LatencyPoint]) -> float:
    """The top of the y axis: the smallest round number above the highest value shown."""
    peak = max((v for p in points for v in (p.p50_ms, p.p95_ms, p.p99_ms, p.p999_ms) if v is not None), default=0.0)
    return next((s for s in _SCALES if peak <= s * 0.95), max(peak * 1.1, _SCALES[-1]))


def render_chart(points: list[LatencyPoint], width: int, height: int) -> list[Text]:
    """The plot area with its y axis: ``height`` lines of ``width`` cells (2 samples per cell)."""
    plot_w = max(1, width - LABEL_WIDTH)
    rows = max(1, height)
    dots_h = rows * 4
    samples = points[-plot_w * 2:]
    top = y_max(samples)
    cells = [[0] * plot_w for _ in range(rows)]
    colours: list[list[str | None]] = [[None] * plot_w for _ in range(rows)]

    def dot_y(value: float) -> int:
        return min(dots_h - 1, max(0, round(value / top * (dots_h - 1))))

    for name, colour in SERIES:
        previous: int | None = None
        for i, point in enumerate(samples):
            value = getattr(point, f"{name}_ms")
            if value is None:
                previous = None
                continue
            y = dot_y(value)
            lo, hi = (y, y) if previous is None else (min(y, previous), max(y, previous))
            col, sub_col = divmod(i, 2)
            for yy in range(lo, hi + 1):
                from_top = dots_h - 1 - yy
                row, sub_row = divmod(from_top, 4)
                cells[row][col] |= _DOTS[sub_row][sub_col]
                colours[row][col] = colour
            previous = y
    slo_rows = {(dots_h - 1 - dot_y(v)) // 4: (v, colour) for v, colour, _ in SLO_LINES if v <= top}
    lines = []
    for row in range(rows):
        line = Text()
        if row in slo_rows:
            line.append(f"{slo_rows[row][0]:>4.0f}┤", style=slo_rows[row][1])
        elif row == 0:
            line.append(f"{top:>4.0f}┤", style="dim")
        elif row == rows - 1:
            line.append(f"{0:>4}┤", style="dim")
        else:
            line.append("    │", style="dim")
        for col in range(plot_w):
            if cells[row][col]:
                line.append(chr(0x2800 + cells[row][col]), style=colours[row][col] or "")
            elif row in slo_rows:
                line.append("┄", style=f"dim {slo_rows[row][1]}")
            else:
                line.append(" ")
        lines.append(line)
    return lines


def legend(point: LatencyPoint | None) -> Text:
    """Current values, coloured like their series; a value over its SLO shows in reverse."""
    text = Text()
    for name, colour in reversed(SERIES):
        value = None if point is None else getattr(point, f"{name}_ms")
        breach = value is not None and name in TARGETS and value >= TARGETS[name]
        text.append(f"{name} ", style=colour)
        text.append(ms(value), style=f"bold reverse {colour}" if breach else "bold")
        text.append("  ")
    text.append("ms", style="dim")
    return text


class LatencyChart(Widget):
    """Shows ``points`` (oldest first); ``note`` explains an empty chart."""

    points: reactive[tuple[LatencyPoint, ...]] = reactive((), always_update=True)
    note: reactive[str] = reactive("waiting for the first poll…")

    def render(self) -> RenderableType:
        width, height = self.content_size.width, self.content_size.height
        points = list(self.points)
        latest = next((p for p in reversed(points) if p.p50_ms is not None), None)
        if not points:
            return Group(unavailable(self.note), legend(None))
        if height < 3:
            return legend(latest)
        return Group(*render_chart(points, width, height - 1), legend(latest))
