"""The latency chart's y axis follows the data: 10 ms heartbeats fill the chart (on the old fixed
400 ms axis they lay flat on its floor), and the SLO lines show only when they are in range."""

from __future__ import annotations

from console.sources.history import LatencyPoint
from console.widgets.latency import render_chart, y_max


def points(p50: float, p95: float, p99: float, p999: float, n: int = 40) -> list[LatencyPoint]:
    return [LatencyPoint(p50, p95, p99, p999) for _ in range(n)]


def rows_with_dots(lines) -> list[int]:
    return [i for i, line in enumerate(lines) if any(0x2800 < ord(ch) <= 0x28FF for ch in line.plain)]


def test_fast_heartbeats_fill_the_chart_without_slo_lines():
    data = points(4.0, 8.0, 10.0, 12.0)
    assert y_max(data) == 20
    lines = render_chart(data, width=45, height=10)
    used = rows_with_dots(lines)
    # The p50 at 4 ms sits a fifth of the way up and p999 at 12 ms above the middle: the lines are
    # apart, not all on the bottom row.
    assert min(used) <= 4 and max(used) >= 7, [line.plain for line in lines]
    assert lines[0].plain.startswith("  20┤")
    assert not any(line.plain.lstrip().startswith(("150┤", "300┤")) for line in lines)


def test_slo_lines_drawn_when_in_range():
    data = points(40.0, 120.0, 180.0, 250.0)
    assert y_max(data) == 300
    labels = [line.plain[:5] for line in render_chart(data, width=45, height=12)]
    assert " 150┤" in labels and " 300┤" in labels
    assert y_max(points(20.0, 60.0, 140.0, 160.0)) == 200
    labels = [line.plain[:5] for line in render_chart(points(20.0, 60.0, 140.0, 160.0), width=45, height=12)]
    assert " 150┤" in labels and " 300┤" not in labels
