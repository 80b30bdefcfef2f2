"""How a feed line looks in the Events panel: quiet for the ordinary, loud for a burst."""

from __future__ import annotations

from console.sources.feed import ALERT, BURST, WARN, FeedLine

_STYLE = {BURST: "bold reverse red", ALERT: "bold red", WARN: "yellow"}


def feed_markup(line: FeedLine) -> tuple[str, str]:
    """The text and the style of a line (an offline burst stands out: reverse red, marked ▲)."""
    prefix = "▲ " if line.severity == BURST else ""
    return f"{prefix}{line.source}: {line.text}", _STYLE.get(line.severity, "")
