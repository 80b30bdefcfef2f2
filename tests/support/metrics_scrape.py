"""Reading a /metrics answer in tests: samples by name and labels, and histogram_quantile
computed the way Prometheus computes it from cumulative buckets."""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Scrape:
    samples: dict[tuple[str, frozenset], float]

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str) -> float:
        """The sum of a metric's samples over all their label sets (e.g. every plane)."""
        return sum(value for (sample, _), value in self.samples.items() if sample == name)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """(le, cumulative count) of a histogram, sorted by le."""
        out = []
        for (sample, sample_labels), value in self.samples.items():
            if sample != name + "_bucket":
                continue
            lab = dict(sample_labels)
            le = lab.pop("le")
            if lab == labels:
                out.append((float(le), value))
        return sorted(out)


def parse(text: str) -> Scrape:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return Scrape(samples)


def scrape(url: str, admin_key: str) -> Scrape:
    req = urllib.request.Request(url + "/metrics", headers={"x-admin": admin_key})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return parse(resp.read().decode())


def bucket_delta(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Buckets of the observations made between two scrapes."""
    old = dict(before)
    return [(le, count - old.get(le, 0.0)) for le, count in after]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile: linear interpolation inside the bucket holding rank q."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def bucket_around(value: float, edges: list[float]) -> tuple[float, float]:
    """(lower, upper) edges of the bucket that holds ``value``."""
    lower = 0.0
    for le in edges:
        if value <= le:
            return lower, le
        lower = le
    return lower, math.inf


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
