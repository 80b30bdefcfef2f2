"""Pool panel: utilisation gauge coloured by status, in use / size / overflow, and its recent past."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from api.contract import pool_status
from api.schemas import PoolHealth
from console.sources.server import Reading
from console.widgets.format import STATUS_STYLE, sparkline, unavailable


class PoolPanel(Widget):
    """Shows ``reading`` (the last /ops/pool_health) and ``series`` (utilisation %, oldest first)."""

    reading: reactive[Reading[PoolHealth] | None] = reactive(None, always_update=True)
    series: reactive[tuple[float, ...]] = reactive((), always_update=True)

    def render(self) -> RenderableType:
        width = max(10, self.content_size.width)
        reading = self.reading
        if reading is None:
            return unavailable("waiting for the first poll…")
        if not reading.ok or reading.value is None:
            return unavailable(reading.message or "no pool figures yet")
        pool = reading.value
        style = STATUS_STYLE.get(pool.status, "bold")
        label = f" {pool.utilization_pct:5.1f}% {pool.status}"
        bar_width = max(4, width - len(label))
        filled = round(bar_width * min(pool.utilization_pct, 100.0) / 100.0)
        gauge = Text("█" * filled, style=style.replace("bold ", "")) + Text("░" * (bar_width - filled), style="dim")
        gauge.append(label, style=style)
        figures = Text.assemble(
            ("in use ", "dim"), (f"{pool.in_use}", "bold"), (f"/{pool.capacity}", ""),
            ("  overflow ", "dim"), (f"{pool.overflow}/{pool.max_overflow}", ""),
            ("  size ", "dim"), (f"{pool.pool_size}", ""),
            no_wrap=True, overflow="ellipsis",
        )
        figures.truncate(width, overflow="ellipsis")
        lines: list[RenderableType] = [gauge, figures]
        if pool.status != "OK" and pool.reasons and self.content_size.height >= 4:
            reason = Text(pool.reasons[0], style=style.replace("bold ", ""), no_wrap=True)
            reason.truncate(width, overflow="ellipsis")
            lines.append(reason)
        spark_rows = max(0, self.content_size.height - len(lines))
        if spark_rows and self.series:
            lines.extend(_spark_rows(list(self.series), width, spark_rows))
        return Group(*lines)


def _style(pct: float) -> str:
    return STATUS_STYLE[pool_status(pct)].replace("bold ", "")


def _spark_rows(values: list[float], width: int, rows: int) -> list[Text]:
    """A sparkline ``rows`` high (0–100 %), drawn as stacked block lines."""
    if rows == 1:
        return [sparkline(values, width, 100.0, _style)]
    out = []
    shown = values[-width:]
    for row in range(rows - 1, -1, -1):  # top row first
        line = Text()
        for value in shown:
            eighths = value / 100.0 * rows * 8 - row * 8
            level = 0 if eighths <= 0 else min(8, max(1, round(eighths)))
            if level:
                line.append("▁▂▃▄▅▆▇█"[level - 1], style=_style(value))
            else:
                line.append("▁" if row == 0 else " ", style="dim")
        out.append(line)
    return out
