"""Prometheus text → what the console shows: heartbeat latency percentiles from the histogram's
bucket deltas between two scrapes, heartbeat and error rates from counter deltas.

The metric names are the server's own (api/contract.py), one spelling each: a /metrics page
without the heartbeat histogram or the accepted counter is an error, not something to guess around.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from api import contract

QUANTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99), ("p999", 0.999))
_BUCKET = f"{contract.HEARTBEAT_WRITE_SECONDS}_bucket"
_ACKED = (contract.HEARTBEATS_ACCEPTED, contract.HEARTBEATS_DUPLICATE)

Buckets = tuple[tuple[float, float], ...]  # (upper edge in seconds, cumulative count), ascending


@dataclass(frozen=True)
class MetricsSample:
    """One scrape reduced to cumulative figures; http_5xx_total is None until the server has
    counted a request of the kind that metric covers."""

    taken_s: float  # monotonic clock of the scrape
    latency_buckets: Buckets
    acked_total: float
    rejected_total: float
    http_5xx_total: float | None


@dataclass(frozen=True)
class Traffic:
    """What happened between two scrapes."""

    interval_s: float
    heartbeats_per_s: float | None
    errors_per_s: float | None
    error_pct: float | None
    observations: int  # latency observations in the interval
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    p999_ms: float | None


def parse_metrics(text: str, taken_s: float) -> MetricsSample:
    """Reduce a Prometheus text exposition to a MetricsSample. Raises ValueError on bad text, or
    when the server's heartbeat metrics are missing from it."""
    buckets: dict[float, float] = defaultdict(float)
    found: set[str] = set()
    acked = rejected = 0.0
    http_5xx: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name == _BUCKET:
                buckets[float(sample.labels["le"])] += sample.value  # summed over label sets
            elif name in _ACKED:
                acked += sample.value
            elif name == contract.HEARTBEATS_REJECTED:
                rejected += sample.value
            elif name == contract.HTTP_REQUESTS:
                is_5xx = sample.labels["status"].startswith("5")
                http_5xx = (http_5xx or 0.0) + (sample.value if is_5xx else 0.0)
            else:
                continue
            found.add(name)
    missing = {_BUCKET, contract.HEARTBEATS_ACCEPTED} - found
    if missing:
        raise ValueError(f"/metrics lacks {', '.join(sorted(missing))}")
    return MetricsSample(taken_s, tuple(sorted(buckets.items())), acked, rejected, http_5xx)


def quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of cumulative buckets, interpolated within its bucket as Prometheus's
    histogram_quantile does; the highest finite edge when it falls in +Inf; None when empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_edge, prev_count = 0.0, 0.0
    for edge, count in buckets:
        if count >= rank and count > prev_count:
            if math.isinf(edge):
                return prev_edge
            return prev_edge + (edge - prev_edge) * (rank - prev_count) / (count - prev_count)
        prev_edge, prev_count = (edge if not math.isinf(edge) else prev_edge), count
    return prev_edge


def bucket_delta(prev: Buckets | None, cur: Buckets) -> Buckets:
    """Observations between two scrapes, per bucket; after a counter reset, the current buckets."""
    if not prev:
        return cur
    before = dict(prev)
    delta = tuple((edge, count - before.get(edge, 0.0)) for edge, count in cur)
    if any(count < 0 for _, count in delta):
        return cur  # the server restarted: counters began again from zero
    return delta


def _rate(prev: float | None, cur: float | None, interval_s: float) -> float | None:
    if cur is None or interval_s <= 0:
        return None
    if prev is None or cur < prev:
        return None if prev is None else cur / interval_s
    return (cur - prev) / interval_s


def diff_metrics(prev: MetricsSample | None, cur: MetricsSample) -> Traffic | None:
    """Rates and latency percentiles between two scrapes; None before there are two."""
    if prev is None:
        return None
    interval_s = cur.taken_s - prev.taken_s
    if interval_s <= 0:
        return None
    delta = bucket_delta(prev.latency_buckets, cur.latency_buckets)
    observations = int(delta[-1][1]) if delta else 0
    percentiles: dict[str, float | None] = {}
    for name, q in QUANTILES:
        value = quantile(q, delta)
        percentiles[name] = None if value is None else value * 1000.0
    acked_per_s = _rate(prev.acked_total, cur.acked_total, interval_s)
    rejected_per_s = _rate(prev.rejected_total, cur.rejected_total, interval_s)
    http_5xx_per_s = _rate(prev.http_5xx_total, cur.http_5xx_total, interval_s)
    errors_per_s = None
    if rejected_per_s is not None or http_5xx_per_s is not None:
        errors_per_s = (rejected_per_s or 0.0) + (http_5xx_per_s or 0.0)
    error_pct = None
    if errors_per_s is not None and acked_per_s is not None:
        attempts = errors_per_s + acked_per_s
        error_pct = 100.0 * errors_per_s / attempts if attempts > 0 else 0.0
    return Traffic(
        interval_s=interval_s,
        heartbeats_per_s=acked_per_s,
        errors_per_s=errors_per_s,
        error_pct=error_pct,
        observations=observations,
        p50_ms=percentiles["p50"],
        p95_ms=percentiles["p95"],
        p99_ms=percentiles["p99"],
        p999_ms=percentiles["p999"],
    )
