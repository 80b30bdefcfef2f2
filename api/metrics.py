"""NexMDM's Prometheus metrics: what is measured, the helpers that record it, the exposition.

Conventions: one prefix (``nexmdm_``), base units (seconds, ratios), ``_total`` on counters, and
no label that carries a device id (labels are bounded: error codes, job names, query types).

Under gunicorn every worker writes its values to mmap files in PROMETHEUS_MULTIPROC_DIR
(prometheus_client's multiprocess mode, chosen when the variable is set before the first import
of prometheus_client), so one scrape of any worker shows the whole server. Gauges declare how
workers combine: ``livesum`` for pool figures (summed over live workers; gunicorn's child_exit
hook removes a dead worker's files), ``livemax`` for the busiest worker's pool utilisation,
``max`` for timestamps. Recording costs a few microseconds and never a database round trip.

This module imports no Flask and touches no database, so jobs and CLIs can call it directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess as pc_multiprocess
from prometheus_client.exposition import generate_latest
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool

from api import contract
from api.contract import PREFIX
from db.events import EVENT_TYPES
from db.job_runs import SCHEDULED_JOBS

_SELF = psutil.Process()

# Bucket edges at the SLO boundaries: 0.02 s (fast read p95), 0.15 s and 0.3 s (heartbeat
# p95/p99), dense below them so a percentile computed from buckets stays close to the truth.
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)
CHECKOUT_WAIT_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FLUSH_ROWS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
JOB_DURATION_BUCKETS_S = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)

# The scheduled jobs and the outcomes job_runs records; pre-created at zero so that
# increase() sees the first failure and the dashboard has a series before the first run.
KNOWN_JOBS = SCHEDULED_JOBS
JOB_OUTCOMES = ("succeeded", "failed", "skipped")
READ_QUERIES = ("device", "list", "summary")
# Label values taken from a request come from closed sets, or any client could mint new series
# (and grow every worker's memory and every scrape) with a made-up method or path.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
UNMATCHED_ENDPOINT = "unmatched"
# Error codes a heartbeat is commonly rejected with (others appear on first use).
REJECT_REASONS = (
    "token_required", "token_invalid", "malformed_json", "validation_failed", "body_too_large",
    "overloaded", "database_unavailable", "pool_exhausted", "statement_timeout", "lock_timeout", "internal_error",
    "too_many_failures", "rate_limited",
)

# The metrics clients decode are named in api/contract.py.
HEARTBEAT_WRITE_SECONDS = Histogram(
    contract.HEARTBEAT_WRITE_SECONDS,
    "Time to handle an acknowledged heartbeat, from its request's arrival at the server (when "
    "the worker knows it) to its COMMIT: wait for the worker, authenticate, validate, write.",
    buckets=LATENCY_BUCKETS_S,
)
HEARTBEATS_ACCEPTED = Counter(contract.HEARTBEATS_ACCEPTED, "Heartbeats stored (new rows).")
HEARTBEATS_DUPLICATE = Counter(
    contract.HEARTBEATS_DUPLICATE,
    "Heartbeats acknowledged as duplicates of one already stored (retries).",
)
HEARTBEATS_REJECTED = Counter(
    contract.HEARTBEATS_REJECTED,
    "Heartbeats answered with an error, by the error code of the answer.",
    ["reason"],
)
LAST_STATUS_READ_SECONDS = Histogram(
    f"{PREFIX}_last_status_read_duration_seconds",
    "Time to answer a fast status read (device status, fleet list, fleet summary).",
    ["query"],
    buckets=LATENCY_BUCKETS_S,
)
INGEST_FLUSH_SECONDS = Histogram(
    f"{PREFIX}_ingest_flush_duration_seconds",
    "Time of one group-commit flush (one multi-row statement and its COMMIT).",
    buckets=LATENCY_BUCKETS_S,
)
INGEST_FLUSH_ROWS = Histogram(
    f"{PREFIX}_ingest_flush_rows", "Heartbeats written per group-commit flush.", buckets=FLUSH_ROWS_BUCKETS,
)
HTTP_REQUEST_SECONDS = Histogram(
    f"{PREFIX}_http_request_duration_seconds",
    "Time to answer a request, by method, endpoint (the route's name, 'unmatched' for an unknown "
    "path) and status; POST /v1/heartbeat is left out (the heartbeat metrics cover it).",
    ["method", "endpoint", "status"],
    buckets=LATENCY_BUCKETS_S,
)
HTTP_REQUESTS = Counter(
    contract.HTTP_REQUESTS,
    "Requests answered, by method (one of HTTP_METHODS, else 'other') and status; "
    "POST /v1/heartbeat is left out.",
    ["method", "status"],
)
HTTP_CONNECTIONS_CLOSED = Counter(
    f"{PREFIX}_http_connections_closed_total",
    "Client connections the server ended: shed (the longest-waiting one, to admit a new one at "
    "WORKER_CONNECTIONS), refused (at the limit with every connection busy), header_timeout, "
    "idle_timeout, body_timeout.",
    ["reason"],
)
TOKEN_CACHE_MISSES = Counter(
    f"{PREFIX}_token_cache_misses_total",
    "Device tokens not in the worker's cache, looked up in the database (a worker's first call "
    "from each device, and after a rotation or revocation). Flat in steady state.",
)
# Worker and pool gauges carry the plane of the worker (device, operator; all when one process
# serves both): /ops/pool_health reports each plane's pools and their sum.
WORKER_PROCESSES = Gauge(
    f"{PREFIX}_worker_processes", "Live API worker processes, by plane.", ["plane"], multiprocess_mode="livesum",
)
POOL_SIZE = Gauge(
    f"{PREFIX}_db_pool_size_connections",
    "Configured pool size (DB_POOL_SIZE), summed over live workers, by plane.", ["plane"],
    multiprocess_mode="livesum",
)
POOL_MAX_OVERFLOW = Gauge(
    f"{PREFIX}_db_pool_max_overflow_connections",
    "Configured pool overflow (DB_MAX_OVERFLOW), summed over live workers, by plane.", ["plane"],
    multiprocess_mode="livesum",
)
POOL_CHECKED_OUT = Gauge(
    f"{PREFIX}_db_pool_checked_out_connections",
    "Connections checked out of the pool (in use), summed over live workers, by plane.", ["plane"],
    multiprocess_mode="livesum",
)
POOL_OVERFLOW = Gauge(
    f"{PREFIX}_db_pool_overflow_connections",
    "Connections open beyond the pool size, summed over live workers, by plane.", ["plane"],
    multiprocess_mode="livesum",
)
POOL_UTILIZATION = Gauge(
    f"{PREFIX}_db_pool_utilization_ratio",
    "Checked out / (pool size + max overflow) of the busiest live worker of the plane (each worker "
    "has its own pool; the one that runs out is the one whose requests fail). Server-wide: "
    "checked_out_connections / (size_connections + max_overflow_connections).",
    ["plane"],
    multiprocess_mode="livemax",
)
# Gauges combined over planes by their maximum (the busiest worker), the others by their sum.
_MAX_OVER_PLANES = frozenset({f"{PREFIX}_db_pool_utilization_ratio"})

POOL_CHECKOUT_WAIT_SECONDS = Histogram(
    f"{PREFIX}_db_pool_checkout_wait_seconds",
    "Time to get a connection from the pool (including opening one), timeouts and failures included.",
    buckets=CHECKOUT_WAIT_BUCKETS_S,
)
POOL_CHECKOUT_TIMEOUTS = Counter(
    f"{PREFIX}_db_pool_checkout_timeouts_total", "Checkouts that gave up after DB_POOL_TIMEOUT_S.",
)
# The label is job_name, not job: Prometheus sets "job" on every scraped series (the scrape job).
JOB_RUNS = Counter(f"{PREFIX}_job_runs_total", "Scheduled job runs, by job and outcome.", ["job_name", "outcome"])
JOB_DURATION_SECONDS = Histogram(
    f"{PREFIX}_job_duration_seconds", "Duration of job runs, by job.", ["job_name"], buckets=JOB_DURATION_BUCKETS_S,
)
# Device events recorded by the events job, by type (a closed set: db.events.EVENT_TYPES).
EVENTS_RECORDED = Counter(f"{PREFIX}_events_recorded_total", "Device events recorded, by type.", ["type"])
JOB_LAST_SUCCESS = Gauge(
    f"{PREFIX}_job_last_success_timestamp_seconds",
    "Unix time at which the job last finished successfully.",
    ["job_name"],
    multiprocess_mode="max",
)

# Figures that page while an incident happens (config/monitoring/alerts.yml). The database's are
# measured when /metrics or /readyz is served ("mostrecent": the latest check of any worker);
# the workers' own every WORKER_SAMPLE_INTERVAL_S by a sampler in each worker.
DATABASE_UP = Gauge(
    f"{PREFIX}_database_up", "1 when the latest check reached the database (readiness), else 0.",
    multiprocess_mode="livemostrecent",
)
POSTGRES_CONNECTIONS = Gauge(
    f"{PREFIX}_postgres_connections", "Client connections open on PostgreSQL (every application).",
    multiprocess_mode="livemostrecent",
)
POSTGRES_CONNECTIONS_LIMIT = Gauge(
    f"{PREFIX}_postgres_connections_limit",
    "Connections PostgreSQL accepts from clients (max_connections minus reserved slots).",
    multiprocess_mode="livemostrecent",
)
INGEST_QUEUE_DEPTH = Gauge(
    f"{PREFIX}_ingest_queue_depth", "Heartbeats waiting to be written, summed over live workers.",
    multiprocess_mode="livesum",
)
INGEST_QUEUE_CAPACITY = Gauge(
    f"{PREFIX}_ingest_queue_capacity", "Room in the ingest queues (INGEST_QUEUE_MAX), summed over live workers.",
    multiprocess_mode="livesum",
)
EVENT_LOOP_LAG_SECONDS = Gauge(
    f"{PREFIX}_event_loop_lag_seconds", "How late the busiest worker's event loop runs a timer.",
    multiprocess_mode="livemax",
)
# The shedder of each live worker that has written a heartbeat (api/shedding.py), sampled every
# 2 s; labelled by plane (no series until then, unlike an unlabelled gauge, which every worker
# would show at 0).
INGEST_OVERLOADED = Gauge(
    f"{PREFIX}_ingest_overloaded", "1 while a worker's shedder finds a standing queue and limits what is in flight.",
    labelnames=("plane",), multiprocess_mode="liveall",
)
INGEST_IN_FLIGHT = Gauge(
    f"{PREFIX}_ingest_in_flight", "Admitted heartbeats not yet answered, in each worker.",
    labelnames=("plane",), multiprocess_mode="liveall",
)
INGEST_IN_FLIGHT_LIMIT = Gauge(
    f"{PREFIX}_ingest_in_flight_limit",
    "Heartbeats in flight a worker admits (INGEST_QUEUE_MAX unless overloaded).",
    labelnames=("plane",), multiprocess_mode="liveall",
)
INGEST_CPU_WAIT_SHARE = Gauge(
    f"{PREFIX}_ingest_cpu_wait_share",
    "Share of the shedder's last interval a worker waited, runnable, for a CPU.",
    labelnames=("plane",), multiprocess_mode="liveall",
)
# Per worker (a pid label in multiprocess mode, where prometheus_client's process_* series are
# not collected): memory, CPU time and file descriptors of each live worker.
PROCESS_RSS_BYTES = Gauge(
    f"{PREFIX}_process_resident_memory_bytes", "Resident memory of each worker.", multiprocess_mode="liveall",
)
PROCESS_CPU_SECONDS = Gauge(
    f"{PREFIX}_process_cpu_seconds", "CPU time (user + system) each worker has used; rate() it.",
    multiprocess_mode="liveall",
)
PROCESS_OPEN_FDS = Gauge(
    f"{PREFIX}_process_open_fds", "Open file descriptors of each worker.", multiprocess_mode="liveall",
)
WORKER_SAMPLE_INTERVAL_S = 2.0


def observe_database(up: bool, connections: int | None = None, limit: int | None = None) -> None:
    """The outcome of a database check, and PostgreSQL's client connections and limit if known."""
    DATABASE_UP.set(1 if up else 0)
    if connections is not None and limit is not None:
        POSTGRES_CONNECTIONS.set(connections)
        POSTGRES_CONNECTIONS_LIMIT.set(limit)


class IngestFigures(Protocol):
    def stats(self) -> dict[str, Any]: ...


def sample_worker(writer: IngestFigures | None, queue_capacity: int, loop_lag_s: float = 0.0,
                  plane: str = "all") -> None:
    """This worker's ingest queue, event-loop lag (the larger of ``loop_lag_s`` and the writer's
    own probe), memory, CPU time and open descriptors."""
    stats = writer.stats() if writer is not None else {}
    INGEST_QUEUE_DEPTH.set(stats.get("queued", 0))
    INGEST_QUEUE_CAPACITY.set(queue_capacity)
    EVENT_LOOP_LAG_SECONDS.set(max(loop_lag_s, stats.get("loop_lag_ms", 0.0) / 1000))
    if "in_flight_limit" in stats:  # a worker that writes heartbeats
        INGEST_OVERLOADED.labels(plane).set(1 if stats["overloaded"] else 0)
        INGEST_IN_FLIGHT.labels(plane).set(stats["in_flight"])
        INGEST_IN_FLIGHT_LIMIT.labels(plane).set(stats["in_flight_limit"])
        INGEST_CPU_WAIT_SHARE.labels(plane).set(stats["cpu_wait_share"])
    with _SELF.oneshot():
        PROCESS_RSS_BYTES.set(_SELF.memory_info().rss)
        cpu = _SELF.cpu_times()
        PROCESS_CPU_SECONDS.set(cpu.user + cpu.system)
        PROCESS_OPEN_FDS.set(_SELF.num_fds())


def start_worker_sampler(writer: Callable[[], IngestFigures | None], queue_capacity: int,
                         plane: str = "all") -> None:
    """Sample this worker (of ``plane``) every WORKER_SAMPLE_INTERVAL_S in a greenlet (under
    gevent only); how late its own timer fires is the event loop's lag."""
    import gevent

    def loop() -> None:
        lag_s = 0.0
        while True:
            try:
                sample_worker(writer(), queue_capacity, lag_s, plane)
            except Exception:  # a failed sample must not end the sampling
                pass
            started = time.monotonic()
            gevent.sleep(WORKER_SAMPLE_INTERVAL_S)
            lag_s = max(0.0, time.monotonic() - started - WORKER_SAMPLE_INTERVAL_S)

    gevent.spawn(loop)

CONNECTION_CLOSE_REASONS = ("shed", "refused", "header_timeout", "idle_timeout", "body_timeout")


def count_closed_connection(reason: str) -> None:
    """Record a connection the server ended (config.gunicorn_worker.ConnectionGuard)."""
    HTTP_CONNECTIONS_CLOSED.labels(reason if reason in CONNECTION_CLOSE_REASONS else "other").inc()


def count_token_lookups(tokens: int) -> None:
    """Record ``tokens`` token-cache misses answered by one database look-up."""
    TOKEN_CACHE_MISSES.inc(tokens)


def method_label(method: str) -> str:
    """The request method as a label value: a standard method, else 'other'."""
    return method if method in HTTP_METHODS else OTHER_METHOD


def observe_request(method: str, endpoint: str | None, status: int, seconds: float) -> None:
    """Record one answered request; labels come from closed sets whatever the client sent."""
    method = method_label(method)
    code = str(status) if 100 <= status <= 599 else "other"
    HTTP_REQUEST_SECONDS.labels(method, endpoint or UNMATCHED_ENDPOINT, code).observe(seconds)
    HTTP_REQUESTS.labels(method, code).inc()


def observe_heartbeat(stored: bool, seconds: float) -> None:
    """Record one acknowledged heartbeat (stored or duplicate) and its handling time."""
    (HEARTBEATS_ACCEPTED if stored else HEARTBEATS_DUPLICATE).inc()
    HEARTBEAT_WRITE_SECONDS.observe(seconds)


def reject_heartbeat(reason: str) -> None:
    """Record one heartbeat answered with an error; ``reason`` is the answer's error code."""
    HEARTBEATS_REJECTED.labels(reason).inc()


def observe_flush(batch_size: int, seconds: float) -> None:
    """GroupCommitWriter/DirectWriter on_flush listener: one committed batch."""
    INGEST_FLUSH_ROWS.observe(batch_size)
    INGEST_FLUSH_SECONDS.observe(seconds)


class JobReportLike(Protocol):
    """What JobMetrics.observe_report reads from a run report (scheduler.locking.JobReport)."""

    job: str
    status: str
    duration_s: float
    finished_at: datetime
    detail: dict[str, Any]


class JobMetrics:
    """The job series of one app: runs by outcome, durations, each job's last success.

    Owned by the app (AppState.job_metrics), not by this module: what it remembers (each job's
    last success, so that a late reading of job_runs cannot move a newer success back; when
    job_runs was last read) lives as long as the app, and two apps in one process share none of it.
    """

    def __init__(self, reread_s: float = 60.0) -> None:
        self.reread_s = reread_s
        self._last_success_s: dict[str, float] = {}
        self._read_mono: float | None = None

    def observe(self, job: str, outcome: str, duration_s: float, finished_at_s: float | None = None) -> None:
        """Record one job run. ``outcome`` is a job_runs status: succeeded, failed or skipped.

        A success also sets the job's last-success timestamp (``finished_at_s``, Unix seconds;
        now when omitted)."""
        if outcome not in JOB_OUTCOMES:
            raise ValueError(f"outcome must be one of {JOB_OUTCOMES}, got {outcome!r}")
        JOB_RUNS.labels(job, outcome).inc()
        JOB_DURATION_SECONDS.labels(job).observe(max(0.0, duration_s))
        if outcome == "succeeded":
            self.set_last_success(job, finished_at_s if finished_at_s is not None else time.time())

    def observe_report(self, report: JobReportLike) -> None:
        """A run's ``on_report`` (scheduler.locking.run_locked): counts every run, skips included,
        and the events the events job recorded."""
        self.observe(report.job, report.status, report.duration_s, report.finished_at.timestamp())
        if report.job == "events" and report.status == "succeeded":
            for kind, count in (report.detail.get("events") or {}).items():
                if kind in EVENT_TYPES:
                    EVENTS_RECORDED.labels(kind).inc(count)

    def set_last_success(self, job: str, finished_at_s: float) -> None:
        """Set a job's last-success time (also from job_runs); never moves it back."""
        if finished_at_s > self._last_success_s.get(job, 0.0):
            self._last_success_s[job] = finished_at_s
            JOB_LAST_SUCCESS.labels(job).set(finished_at_s)

    def reread_due(self, now_mono: float) -> bool:
        """Whether job_runs is to be read again now (never read yet, or ``reread_s`` ago: runs
        made by another process are seen that way); a True answer counts as the reading."""
        if self._read_mono is not None and now_mono - self._read_mono < self.reread_s:
            return False
        self._read_mono = now_mono
        return True


def initialize_series() -> None:
    """Create the labelled series that must exist at zero before their first event."""
    for job in KNOWN_JOBS:
        JOB_DURATION_SECONDS.labels(job)
        for outcome in JOB_OUTCOMES:
            JOB_RUNS.labels(job, outcome)
    for kind in EVENT_TYPES:
        EVENTS_RECORDED.labels(kind)
    for query in READ_QUERIES:
        LAST_STATUS_READ_SECONDS.labels(query)
    for reason in REJECT_REASONS:
        HEARTBEATS_REJECTED.labels(reason)
    for reason in CONNECTION_CLOSE_REASONS:
        HTTP_CONNECTIONS_CLOSED.labels(reason)


class ReplicaStateLike(Protocol):
    """What ReplicaGauges.observe reads from a lag measurement (db.reads.ReplicaState)."""

    reachable: bool
    lag_s: float | None


class ReplicaGauges:
    """The read replica's lag and reachability, as one app's lag guard measures them.

    The gauges are created on the first measurement, so only processes that read from a replica
    export them (a device-plane worker's zero would otherwise read as "no lag" and "down"). They
    live in this object's own registry (``registry``, which /metrics renders with the default
    one), so two apps in one process never register the same series twice.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._gauges: tuple[Gauge, Gauge] | None = None

    def _series(self) -> tuple[Gauge, Gauge]:
        if self._gauges is None:
            self._gauges = (
                Gauge(f"{PREFIX}_replica_lag_seconds",
                      "Upper bound of the read replica's lag, measured every second by the lag guard "
                      "(NaN while it cannot be reached). Above READ_MAX_LAG_S, reads go to the primary.",
                      multiprocess_mode="livemax", registry=self.registry),
                Gauge(f"{PREFIX}_replica_up", "1 while the read replica answers the lag guard as a standby, else 0.",
                      multiprocess_mode="livemin", registry=self.registry),
            )
        return self._gauges

    def observe(self, state: ReplicaStateLike) -> None:
        """The lag guard's listener: publish one measurement."""
        lag, up = self._series()
        up.set(1 if state.reachable else 0)
        lag.set(state.lag_s if state.reachable and state.lag_s is not None else float("nan"))


def mark_worker_ready(plane: str) -> None:
    """Count this process among the live workers of ``plane`` (summed over live workers)."""
    WORKER_PROCESSES.labels(plane).set(1)


F = TypeVar("F", bound=Callable[..., Any])


def timed_read(query: str) -> Callable[[F], F]:
    """Decorator: observe a fast read's handling time under ``query`` when it succeeds."""
    histogram = LAST_STATUS_READ_SECONDS.labels(query)

    def decorate(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = view(*args, **kwargs)
            histogram.observe(time.perf_counter() - started)
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


class MeteredQueuePool(QueuePool):
    """A QueuePool that publishes its size, use, overflow, checkout waits and timeouts, under the
    label of its class's ``plane`` (``metered_pool(plane)`` makes the class of a plane).

    The figures are written on checkout and checkin (a few mmap writes, no I/O). One metered
    pool per process: the app's engine.
    """

    plane: ClassVar[str] = "all"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plane = self.plane
        self._capacity = max(1, self.size() + max(0, self._max_overflow))
        self._gauge_checked_out = POOL_CHECKED_OUT.labels(plane)
        self._gauge_overflow = POOL_OVERFLOW.labels(plane)
        self._gauge_utilization = POOL_UTILIZATION.labels(plane)
        POOL_SIZE.labels(plane).set(self.size())
        POOL_MAX_OVERFLOW.labels(plane).set(max(0, self._max_overflow))
        self._publish()

    def _do_get(self) -> Any:
        started = time.perf_counter()
        try:
            return super()._do_get()
        except PoolTimeout:
            POOL_CHECKOUT_TIMEOUTS.inc()
            raise
        finally:  # failed connects too: the caller waited all the same
            POOL_CHECKOUT_WAIT_SECONDS.observe(time.perf_counter() - started)
            self._publish()

    def _do_return_conn(self, record: Any) -> None:
        super()._do_return_conn(record)
        self._publish()

    def recreate(self) -> QueuePool:
        """The replacement pool (engine.dispose()); this one publishes nothing from now on: its
        connections still coming back would report the old pool's figures, below zero."""
        self._retired = True
        return super().recreate()

    def _publish(self) -> None:
        if getattr(self, "_retired", False):
            return
        checked_out = max(0, self.checkedout())
        self._gauge_checked_out.set(checked_out)
        self._gauge_overflow.set(max(0, self.overflow()))
        self._gauge_utilization.set(checked_out / self._capacity)


def metered_pool(plane: str) -> type[MeteredQueuePool]:
    """The MeteredQueuePool class of ``plane`` (a class, not an argument: SQLAlchemy recreates a
    disposed pool from its class, and the new one must keep the plane)."""
    return type("MeteredQueuePool", (MeteredQueuePool,), {"plane": plane, "__module__": __name__})


def prepare_multiproc_dir(path: Path) -> Path:
    """Create the multiprocess directory, or empty it of a previous run's value files.

    Call before gunicorn starts (stale files would add a dead run's counts to the new one).
    Only ``*.db`` files are removed, so a directory shared by mistake loses nothing else.
    """
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    return path


def _sized_files(paths: Iterable[Path]) -> list[str]:
    # A starting worker creates its file empty and sizes it a moment later; reading it in
    # between raises in prometheus_client. Its values are all zero then, so skip it.
    out = []
    for path in paths:
        try:
            if path.stat().st_size > 0:
                out.append(str(path))
        except FileNotFoundError:  # a dead worker's live gauges, just removed
            continue
    return out


class _MultiProcessCollector(pc_multiprocess.MultiProcessCollector):
    """prometheus_client's collector, minus the files of a worker that is still starting."""

    def collect(self) -> Iterable[Any]:
        return self.merge(_sized_files(Path(self._path).glob("*.db")), accumulate=True)


def exposition_registry(multiproc_dir: Path | None, extra: Iterable[CollectorRegistry] = ()) -> list[Any]:
    """The registries one scrape reads: every worker's files in multiprocess mode (where every
    series is), else this process's default registry and the app's own ``extra`` ones."""
    if multiproc_dir is not None:
        registry = CollectorRegistry()
        _MultiProcessCollector(registry, path=str(multiproc_dir))
        return [registry]
    return [REGISTRY, *extra]


def render_metrics(multiproc_dir: Path | None, extra: Iterable[CollectorRegistry] = ()) -> tuple[bytes, str]:
    """The Prometheus text exposition of the whole server and its content type (``extra``: the
    app's own registries, see exposition_registry)."""
    body = b"".join(generate_latest(r) for r in exposition_registry(multiproc_dir, extra))
    return body, CONTENT_TYPE_LATEST


def live_gauge_values(multiproc_dir: Path | None) -> dict[str, float]:
    """The whole server's pool figures and worker count, by name: each gauge summed over the
    planes (utilisation: the busiest plane's). Multiprocess mode reads only the live-gauge files
    (cheap); otherwise this process's gauges."""
    values: dict[str, float] = {}
    for plane_values in live_gauge_values_by_plane(multiproc_dir).values():
        for name, value in plane_values.items():
            values[name] = max(values.get(name, value), value) if name in _MAX_OVER_PLANES else (
                values.get(name, 0.0) + value)
    return values


def live_gauge_values_by_plane(multiproc_dir: Path | None) -> dict[str, dict[str, float]]:
    """Pool figures and worker count per plane (``{"device": {name: value}, ...}``)."""
    if multiproc_dir is not None:
        files = _sized_files(multiproc_dir.glob("gauge_live*_*.db"))
        families: Iterable[Any] = pc_multiprocess.MultiProcessCollector.merge(files, accumulate=False)
    else:
        families = REGISTRY.collect()
    planes: dict[str, dict[str, float]] = {}
    for family in families:
        if family.type != "gauge" or not family.name.startswith(PREFIX):
            continue
        for sample in family.samples:
            if set(sample.labels) == {"plane"}:
                planes.setdefault(sample.labels["plane"], {})[sample.name] = sample.value
    return planes
