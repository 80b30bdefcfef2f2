"""Small text formats shared by the panels."""

from __future__ import annotations

from datetime import datetime

from rich.text import Text

STATUS_STYLE = {"OK": "bold green", "WARN": "bold yellow", "CRITICAL": "bold red"}
BLOCKS = " ▁▂▃▄▅▆▇█"


def ms(value: float | None) -> str:
    """A latency in ms, to 3 significant figures; '—' when unknown."""
    if value is None:
        return "—"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def count(value: float | None) -> str:
    """A count with thousands separators; '—' when unknown."""
    return "—" if value is None else f"{value:,.0f}"


def age(when: datetime | None, now: datetime) -> str:
    """How long ago, compactly: 12s, 5m, 3h, 2d."""
    if when is None:
        return "—"
    seconds = max(0.0, (now - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def unavailable(message: str) -> Text:
    """How a panel says its data is not there (not an error of the console)."""
    return Text(message or "unavailable", style="dim italic")


def sparkline(values: list[float], width: int, top: float, style_for: object = None) -> Text:
    """One line of block characters for the last ``width`` values, scaled to 0..top."""
    text = Text()
    for value in values[-width:] if width > 0 else []:
        level = 0 if top <= 0 else min(len(BLOCKS) - 1, max(1 if value > 0 else 0, round(value / top * 8)))
        style = style_for(value) if callable(style_for) else ""
        text.append(BLOCKS[level], style=style)
    return text
