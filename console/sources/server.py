"""One poll of the server: /metrics, /ops/pool_health, /ops/jobs and /v1/fleet/summary, each read
independently so one missing or failing endpoint never hides the others.

Each answer is decoded with the server's own schema (api/schemas.py), one spelling per field: a
field renamed or missing on the server is an error here ("unreadable answer"), not a guess that
hides it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec

from api import schemas
from api.schemas import PoolHealth
from console.sources.feed import AuditSource, FeedLine, FeedSource, FleetEventsSource
from console.sources.http import AUTH, DOWN, ERROR, UNAVAILABLE, ApiClient, EndpointError
from console.sources.metrics import MetricsSample, Traffic, diff_metrics, parse_metrics

T = TypeVar("T")
JOBS = ("partitions", "nightly", "reconcile")


@dataclass(frozen=True)
class Reading(Generic[T]):
    """What one endpoint gave: a value, or why not (kind is http.DOWN/AUTH/UNAVAILABLE/ERROR)."""

    value: T | None = None
    kind: str = "ok"
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the endpoint answered with usable data."""
        return self.kind == "ok" and self.value is not None


@dataclass(frozen=True)
class JobRun:
    """One recorded run of a scheduled job."""

    job: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    detail: str


@dataclass(frozen=True)
class FleetSummary:
    """Counts for the whole fleet."""

    total: int
    online: int
    offline: int
    low_battery: int  # battery below 20 %: the critical and low bands
    app_versions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerSnapshot:
    """Everything one poll learnt. ``status`` sums it up: ok, down or auth."""

    polled_at: datetime
    duration_s: float
    status: str
    message: str
    pool: Reading[PoolHealth]
    traffic: Reading[Traffic]
    jobs: Reading[dict[str, JobRun]]  # the latest run of each job, by job name
    fleet: Reading[FleetSummary]
    feed: tuple[FeedLine, ...] = ()  # new lines for the Events panel, from every feed source


def parse_pool_health(body: Any) -> PoolHealth:
    """Decode GET /ops/pool_health (api.schemas.PoolHealth)."""
    return msgspec.convert(body, PoolHealth)


def parse_jobs(body: Any) -> dict[str, JobRun]:
    """Decode GET /ops/jobs (api.schemas.JobRunList) into the latest run of each job."""
    latest: dict[str, JobRun] = {}
    for run in msgspec.convert(body, schemas.JobRunList).runs:
        seen = latest.get(run.job)
        if seen is None or run.started_at > seen.started_at:
            latest[run.job] = JobRun(run.job, run.status, run.started_at, run.finished_at, _job_detail(run))
    return latest


def _job_detail(run: schemas.JobRun) -> str:
    """One line about a run: its error when it failed, else its detail as key=value pairs."""
    if run.status == "failed" and run.error:
        lines = run.error.strip().splitlines()
        return lines[0] if lines else ""
    return ", ".join(f"{k}={v}" for k, v in (run.detail or {}).items() if not isinstance(v, dict | list))


def parse_fleet(body: Any) -> FleetSummary:
    """Decode GET /v1/fleet/summary (api.schemas.FleetSummary)."""
    summary = msgspec.convert(body, schemas.FleetSummary)
    return FleetSummary(
        total=summary.total,
        online=summary.online,
        offline=summary.offline,
        low_battery=summary.battery.get("critical", 0) + summary.battery.get("low", 0),
        app_versions=dict(summary.app_versions),
    )


class ServerPoller:
    """Polls the server; keeps the previous metrics scrape so rates and percentiles are deltas.

    Not thread-safe by design: the console runs one poll at a time (the next is scheduled only
    when the last has finished)."""

    def __init__(self, client: ApiClient, clock: Callable[[], float] = time.monotonic,
                 feeds: list[FeedSource] | None = None) -> None:
        self.client = client
        self._clock = clock
        self._last_metrics: MetricsSample | None = None
        self.feeds: list[FeedSource] = feeds if feeds is not None else [FleetEventsSource(client), AuditSource(client)]

    def poll(self) -> ServerSnapshot:
        """Read every endpoint once; never raises for what the server does."""
        started = self._clock()
        polled_at = datetime.now(UTC)
        fleet = self._read(lambda: parse_fleet(self.client.get_json("/v1/fleet/summary")))
        if fleet.kind == DOWN:
            self._last_metrics = None
            down: Reading[Any] = Reading(kind=DOWN, message="server down")  # the snapshot carries the detail
            return ServerSnapshot(polled_at, self._clock() - started, DOWN, fleet.message, down, down, down, down)
        traffic = self._read(self._scrape)
        pool = self._read(lambda: parse_pool_health(self.client.get_json("/ops/pool_health")))
        jobs = self._read(self._jobs)
        readings = (fleet, traffic, pool, jobs)
        if any(r.kind == AUTH for r in readings):
            status, message = AUTH, next(r.message for r in readings if r.kind == AUTH)
        elif any(r.kind == DOWN for r in readings):
            status, message = DOWN, next(r.message for r in readings if r.kind == DOWN)
        else:
            status, message = "ok", ""
        feed = self._feed() if status == "ok" else ()
        return ServerSnapshot(polled_at, self._clock() - started, status, message, pool, traffic, jobs, fleet, feed)

    def _feed(self) -> tuple[FeedLine, ...]:
        lines: list[FeedLine] = []
        for source in self.feeds:
            try:
                lines += source.poll()
            except EndpointError as err:  # the source keeps its cursor and tries again next poll
                lines.append(FeedLine(datetime.now(UTC), source.name, "warn", f"{source.name} events: {err.message}"))
        return tuple(lines)

    def _jobs(self) -> dict[str, JobRun]:
        """The latest run of each job: one call for the recent runs, then one per job still
        missing (a job that runs rarely can fall out of the recent list)."""
        latest = parse_jobs(self.client.get_json("/ops/jobs?limit=100"))
        for job in JOBS:
            if job not in latest:
                latest.update(parse_jobs(self.client.get_json(f"/ops/jobs?job={job}&limit=1")))
        return latest

    def _scrape(self) -> Traffic | None:
        text = self.client.get_text("/metrics")
        sample = parse_metrics(text, self._clock())
        traffic = diff_metrics(self._last_metrics, sample)
        self._last_metrics = sample
        return traffic

    @staticmethod
    def _read(fetch: Callable[[], T]) -> Reading[T]:
        try:
            value = fetch()
        except EndpointError as err:
            return Reading(kind=err.kind, message=err.message)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            return Reading(kind=ERROR, message=f"unreadable answer: {err}")
        if value is None:
            return Reading(kind="ok", message="waiting for a second scrape")
        return Reading(value=value)


def run_job(client: ApiClient, job: str) -> Any:
    """POST /ops/<job>: run a scheduled job now; returns the server's report. Raises EndpointError."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}")
    return client.post_json(f"/ops/{job}")


__all__ = [
    "AUTH", "DOWN", "ERROR", "UNAVAILABLE", "JobRun", "PoolHealth", "Reading", "ServerPoller", "ServerSnapshot",
    "run_job",
]
