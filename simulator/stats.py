"""Latency histograms and counters: every request ends in one ``record(...)`` call here.

Latencies go into bounded, mergeable HdrHistograms (the ``hdrhistogram`` package, microsecond
units, 3 significant digits, 1 µs .. 120 s). ``record_us`` is an inlined copy of the package's
``record_value`` (same counts array, so histograms stay mergeable and encodable) because the
package's version costs several Python calls per value and the generator records thousands
of values per second. Percentiles are computed with C-level ``accumulate`` + ``bisect`` over the
counts array rather than the package's per-index Python loop.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 120_000_000
SIGNIFICANT_FIGURES = 3
PERCENTILES = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p999", 99.9))


def new_histogram() -> HdrHistogram:
    """An empty latency histogram (µs, 1 µs .. 120 s, 3 significant digits)."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def record_us(hist: HdrHistogram, value_us: int) -> None:
    """Record one latency in µs (clamped into the histogram's range); same effect as
    ``hist.record_value`` but a few times cheaper."""
    if value_us < 0:
        value_us = 0
    elif value_us > HIGHEST_US:
        value_us = HIGHEST_US
    unit = hist.unit_magnitude
    bucket = (value_us | hist.sub_bucket_mask).bit_length() - unit - hist.sub_bucket_half_count_magnitude - 1
    sub = value_us >> (bucket + unit)
    hist.counts[((bucket + 1) << hist.sub_bucket_half_count_magnitude) + sub - hist.sub_bucket_half_count] += 1
    hist.total_count += 1
    if value_us < hist.min_value:
        hist.min_value = value_us
    if value_us > hist.max_value:
        hist.max_value = value_us


def percentiles_ms(hist: HdrHistogram) -> dict[str, float | None]:
    """p50, p95, p99, p999 and max in milliseconds (None when the histogram is empty)."""
    total = hist.total_count
    if not total:
        return {name: None for name, _ in PERCENTILES} | {"max": None}
    last = hist._counts_index_for(hist.max_value)
    cumulative = list(itertools.accumulate(hist.counts[: last + 1]))
    result: dict[str, float | None] = {}
    for name, pct in PERCENTILES:
        target = max(1, int(pct * total / 100 + 0.5))
        index = bisect.bisect_left(cumulative, target)
        value = hist.get_highest_equivalent_value(hist.get_value_from_index(index))
        result[name] = round(min(value, hist.max_value) / 1000, 3)
    result["max"] = round(hist.max_value / 1000, 3)
    return result


def merge(into: HdrHistogram, other: HdrHistogram) -> HdrHistogram:
    """Add ``other``'s counts to ``into`` (C-level array add) and return ``into``. The exact
    min and max survive (the package's add rounds them to their bucket's edge)."""
    if other.total_count:
        low, high = min(into.min_value, other.min_value), max(into.max_value, other.max_value)
        into.add(other)
        into.min_value, into.max_value = low, high
    return into


@dataclass
class KindStats:
    """One kind of request (heartbeat, read): a cumulative and a per-second latency histogram,
    outcome counters, errors by kind."""

    total: HdrHistogram = field(default_factory=new_histogram)
    window: HdrHistogram = field(default_factory=new_histogram)
    ok: int = 0
    errors: int = 0
    window_ok: int = 0
    window_errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)

    def roll_window(self) -> dict[str, Any]:
        """Close the current one-second window: fold it into the total, return its figures."""
        figures = {"ok": self.window_ok, "errors": self.window_errors, **percentiles_ms(self.window)}
        merge(self.total, self.window)
        self.window = new_histogram()
        self.window_ok = 0
        self.window_errors = 0
        return figures

    def cumulative_hist(self) -> HdrHistogram:
        """Total plus the still-open window (a copy; neither is changed)."""
        hist = new_histogram()
        merge(hist, self.total)
        merge(hist, self.window)
        return hist


class Stats:
    """The run's statistics. ``record`` is the single entry point of every request outcome."""

    def __init__(self) -> None:
        self.kinds: dict[str, KindStats] = {"heartbeat": KindStats(), "read": KindStats()}
        self.counters: dict[str, int] = {}
        self.window_sent = 0
        self.sent = 0

    def count(self, name: str, n: int = 1) -> None:
        """Bump a named counter (stored, duplicate, retries_lost_answer, gave_up, ...)."""
        self.counters[name] = self.counters.get(name, 0) + n

    def sent_one(self) -> None:
        """A heartbeat attempt left the generator."""
        self.sent += 1
        self.window_sent += 1

    def record(self, kind: str, latency_us: int, error: str | None = None) -> None:
        """One finished request: its latency from the intended send time, and its error kind
        (None when it succeeded). Errors count towards the error rate, not the histogram.
        Kinds: "heartbeat", "read", and per read endpoint "read:<endpoint>" (created on use)."""
        stats = self.kinds.get(kind)
        if stats is None:
            stats = self.kinds[kind] = KindStats()
        if error is None:
            stats.ok += 1
            stats.window_ok += 1
            record_us(stats.window, latency_us)
        else:
            stats.errors += 1
            stats.window_errors += 1
            stats.errors_by_kind[error] = stats.errors_by_kind.get(error, 0) + 1
