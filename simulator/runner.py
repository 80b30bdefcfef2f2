"""The load: pace the enrolled fleet open-loop against the server.

One scheduler greenlet pops due sends from a heap and dispatches them the way the fleet holds
its connections (``Behaviour.connection_mode``, see devices.py): to worker greenlets that each
own one shared keep-alive connection (pooled, spawned on demand up to ``max_connections``), on
the device's own keep-alive connection (per device), or on a new connection per heartbeat. A
device is a small object, not a greenlet, so 100,000 devices cost memory, not scheduling.
Every request ends in one ``Stats.record`` call with its latency measured from the *intended*
send time. What a device does is in devices.py; the report is built in report.py.

Retries: a 503 (Retry-After honoured), a 5xx, a timeout or a dropped connection are retried
with the same body after a jittered exponential backoff; the latency of the eventual answer
still counts from the first intended send. A flaky device that "loses" an answer resends the
same body shortly after, and the server must answer ``duplicate``.
"""

from __future__ import annotations

import gc
import heapq
import random
import resource
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import gevent
import msgspec
from gevent.queue import Queue

from api.schemas import PoolHealth
from simulator import report as rep
from simulator.devices import (
    CONNECTION_MODES,
    NEW_CONNECTION,
    PER_DEVICE,
    POOLED,
    Behaviour,
    Device,
    ReadMix,
    WallClock,
    clock_offsets_s,
    first_send_offset_s,
    is_retryable,
    next_send_s,
    resend_delay_s,
    retry_delay_s,
)
from simulator.outage import check_outage, plan_outage
from simulator.server import (
    AdminApi,
    EnrolledDevice,
    UsageError,
    check_server,
    default_token_cache,
    enroll_fleet,
    split_or_usage,
    verify_no_loss,
)
from simulator.stats import Stats, merge, new_histogram, percentiles_ms, record_us
from simulator.transport import TransportError, connect

# The scheduler sleeps at least this long between dispatch rounds: at 2,500 sends/s it wakes
# about 1,000 times a second instead of once per send. The added wait (at most 1 ms) counts in
# the latencies, which start at the intended send time.
TICK_S = 0.001


@dataclass(frozen=True)
class SimConfig:
    """One run's settings (the CLI flags)."""

    url: str  # the device plane (heartbeats)
    admin_key: str
    devices: int
    duration_s: float
    interval_s: float = 60.0
    jitter_s: float = 15.0
    ramp_up_s: float = 0.0
    read_rate: float = 0.0
    read_mix: ReadMix = ReadMix()
    reads_only: bool = False  # an operator's console beside the fleet: the read mix, no heartbeats
    flaky_pct: float = 5.0
    skewed_clock_pct: float = 0.0
    connection_mode: str = POOLED
    max_connections: int = 512
    timeout_s: float = 10.0
    max_retries: int = 5
    drain_s: float = 30.0
    client: str = "raw"
    seed: int = 1
    token_cache: Path | None = None
    enroll_batch: int = 1000
    verify_sample: int = 0  # 0: check every device
    progress_jsonl: bool = False
    show_progress: bool = True
    targets: rep.Targets = rep.SEED_TARGETS
    # --outage-pct/--outage-at/--outage-for/--outage-grace (simulator/outage.py); pct 0: no outage
    outage_pct: float = 0.0
    outage_at_s: float = 30.0
    outage_for_s: float = 240.0
    outage_grace_s: float = 30.0
    admin_url: str = ""  # the operator plane (enrollment, reads, pool health); "" = url (one plane)

    @property
    def operator_url(self) -> str:
        """Where the operator calls go: --admin-url, or --url for a single-plane server."""
        return self.admin_url or self.url

    @property
    def expected_per_s(self) -> float:
        """Heartbeats per second the schedule offers once every device is active."""
        return 0.0 if self.reads_only else self.devices / self.interval_s

    @property
    def equivalent_fleet_at_60s(self) -> int:
        """The fleet size that gives the same rate at one heartbeat per 60 s."""
        return round(self.devices * 60.0 / self.interval_s)

    def validate(self) -> None:
        """Raise UsageError naming the first bad setting."""
        split_or_usage(self.url)
        split_or_usage(self.operator_url)
        checks = [
            (self.devices >= 1, "--devices must be at least 1"),
            (self.duration_s > 0, "--duration must be positive"),
            (self.interval_s > 0, "--interval must be positive"),
            (0 <= self.jitter_s < self.interval_s, "--jitter must be at least 0 and smaller than --interval"),
            (self.ramp_up_s >= 0, "--ramp-up must not be negative"),
            (self.read_rate >= 0, "--read-rate must not be negative"),
            (self.read_rate > 0 or not self.reads_only, "--reads-only needs a --read-rate"),
            (0 <= self.flaky_pct <= 100, "--flaky-pct must be between 0 and 100"),
            (0 <= self.skewed_clock_pct <= 100, "--skewed-clock-pct must be between 0 and 100"),
            (self.connection_mode in CONNECTION_MODES, f"the connection mode must be one of {CONNECTION_MODES}"),
            (self.max_connections >= 1, "--connections must be at least 1"),
            (self.timeout_s > 0, "--timeout must be positive"),
            (self.max_retries >= 0, "--max-retries must not be negative"),
            (self.client in ("raw", "ghc"), "--client must be raw or ghc"),
            (self.connection_mode == POOLED or self.client == "raw",
             "--connection-per-device and --new-connection use the raw client"),
            (bool(self.admin_key), "--admin-key is required"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


class Ack(msgspec.Struct):
    status: str
    bucket_ts: datetime


_decode_ack = msgspec.json.Decoder(Ack).decode


class Job:
    """One heartbeat (or read) on its way; a retry reuses the job and its body."""

    __slots__ = ("device", "body", "intended_s", "due_s", "attempt", "lose_answer", "resend_of", "path", "endpoint")

    def __init__(self, device: Device | None, intended_s: float, lose_answer: bool = False,
                 body: bytes | None = None, resend_of: str | None = None, path: bytes = b"",
                 endpoint: str = "") -> None:
        self.device = device
        self.body = body
        self.intended_s = intended_s
        self.due_s = intended_s
        self.attempt = 0
        self.lose_answer = lose_answer
        self.resend_of = resend_of  # the status the lost answer carried, for a lost-answer resend
        self.path = path
        self.endpoint = endpoint


@dataclass
class RunResult:
    """What a load phase produced (input to the report)."""

    stats: Stats
    series: list[dict[str, Any]]
    acked: dict[int, array]
    lag_ms: dict[str, float | None]
    pool_samples: list[float]
    cpu_s: float
    wall_s: float
    rss_mb: float
    connections: int
    abandoned: int
    started_at: str
    finished_at: str
    versions: dict[str, int] = field(default_factory=dict)
    gc_max_pause_ms: float = 0.0
    load_s: float = 0.0
    cpu_sys_s: float = 0.0  # of cpu_s, in the kernel (mostly loopback TCP)
    connects: int = 0  # TCP connections opened during the run
    # PostgreSQL's CPU seconds as the server read them (monotonic time, seconds, host cores), and
    # where they came from, or why there are none.
    db_cpu_samples: list[tuple[float, float, int]] = field(default_factory=list)
    db_cpu_source: str | None = None


class _GcPauses:
    """A gc callback that remembers the longest collection."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self._start = 0.0

    def __call__(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.max_s = max(self.max_s, time.perf_counter() - self._start)


@contextmanager
def _frozen_heap() -> Iterator[_GcPauses]:
    """Keep what exists now (the fleet, its schedule) out of the collector's scans, whose pauses
    would otherwise show in the generator's own tail latency; measure the pauses left."""
    gc.collect()
    gc.freeze()
    pauses = _GcPauses()
    gc.callbacks.append(pauses)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(pauses)
        gc.unfreeze()


class LoadRun:
    """Pace the fleet open-loop for ``duration_s`` seconds (then drain retries)."""

    def __init__(self, cfg: SimConfig, fleet: list[EnrolledDevice], emit: Callable[[dict[str, Any]], None],
                 admin_headers: bytes | None = None) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.behaviour = Behaviour(
            interval_s=cfg.interval_s, jitter_s=cfg.jitter_s, flaky_share=cfg.flaky_pct / 100,
            rollout_start_s=cfg.ramp_up_s + 0.2 * cfg.duration_s, rollout_end_s=cfg.ramp_up_s + 0.8 * cfg.duration_s,
            connection_mode=cfg.connection_mode, read_mix=cfg.read_mix,
        )
        self.devices = [
            Device(i, d.device_id, d.device_uid, d.token, self.rng, self.rng.random() < self.behaviour.flaky_share,
                   self.rng.random())
            for i, d in enumerate(fleet)
        ]
        # a separate stream: the rest of the fleet is the same with or without skewed clocks
        offsets = clock_offsets_s(len(self.devices), cfg.skewed_clock_pct / 100, random.Random(cfg.seed + 1))
        for device, offset in zip(self.devices, offsets, strict=True):
            device.clock_offset_s = offset
        self.emit = emit
        self.admin_headers = admin_headers or f"x-admin: {cfg.admin_key}\r\n".encode()
        self.stats = Stats()
        self.lag = new_histogram()
        self.lag_window = new_histogram()
        self.acked: dict[int, array] = {}
        self.heap: list[tuple[float, int, Device | None, Job | None]] = []
        self.seq = 0
        self.queue: Queue = Queue()
        self.workers: list[gevent.Greenlet] = []
        self.idle = 0
        self.inflight = 0
        # per-device mode: each device's own connection (None until its first send), and
        # whether a send is using it (a retry may overlap the next scheduled send)
        self.device_conns: list[Any] = [None] * len(self.devices) if cfg.connection_mode == PER_DEVICE else []
        self.device_busy = bytearray(len(self.devices)) if cfg.connection_mode == PER_DEVICE else bytearray()
        self.open_conns = 0
        self.peak_conns = 0
        self.connects = 0
        self.hb_headers_extra = b"Connection: close\r\n" if cfg.connection_mode == NEW_CONNECTION else b""
        self.clock = WallClock()
        self.skewed_clock = WallClock()  # its own cache: offsets would thrash the shared one
        self.t0 = 0.0
        self.series: list[dict[str, Any]] = []
        self.pool_samples: list[float] = []
        self.pool_latest: float | None = None
        self.db_cpu_samples: list[tuple[float, float, int]] = []
        self.db_cpu_source: str | None = None
        self.phase = "load"
        self.end_s = cfg.duration_s  # moves earlier when a stop is requested
        self.outage = (plan_outage(len(self.devices), cfg.outage_pct, cfg.outage_at_s, cfg.outage_for_s, cfg.seed)
                       if cfg.outage_pct else None)
        self.went_offline_ids: set[int] = set()  # flaky devices that fell silent by themselves

    def request_stop(self) -> None:
        """End the load now (a signal, the console's Stop): in-flight sends and their retries
        drain, then the run reports as usual."""
        now = time.perf_counter() - self.t0 if self.t0 else 0.0
        self.end_s = min(self.end_s, now)

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """The whole load phase; returns once every send is answered or abandoned."""
        self._schedule_first_sends()
        with _frozen_heap() as gc_pauses:
            started_at = datetime.now(UTC).isoformat()
            usage0 = resource.getrusage(resource.RUSAGE_SELF)
            self.t0 = time.perf_counter()
            helpers = [gevent.spawn(self._sampler), gevent.spawn(self._pool_poller)]
            self._pace()
            abandoned = self._drain()
            wall_s = time.perf_counter() - self.t0
            usage1 = resource.getrusage(resource.RUSAGE_SELF)
            self._stop(helpers)
        self._sample(final=True)
        return self._result(usage0, usage1, wall_s, abandoned, started_at, gc_pauses.max_s)

    def _schedule_first_sends(self) -> None:
        cfg = self.cfg
        for i, device in enumerate(self.devices):
            device.app_version = self.behaviour.base_version
            if cfg.reads_only:
                continue  # the fleet's heartbeats come from elsewhere (another simulator, real devices)
            self._push(first_send_offset_s(i, len(self.devices), cfg.interval_s, cfg.ramp_up_s, self.rng), device, None)

    def _pace(self) -> None:
        """Dispatch sends as they come due until the load ends and every retry has drained
        (or ``drain_s`` has passed)."""
        cfg = self.cfg
        read_period = 1.0 / cfg.read_rate if cfg.read_rate > 0 else None
        next_read = 0.0
        heap = self.heap
        perf = time.perf_counter
        while True:
            now = perf() - self.t0
            while heap and heap[0][0] <= now:
                due, _, device, job = heapq.heappop(heap)
                if job is None:
                    self._tick(device, due)
                else:
                    self._dispatch(job)
            while read_period is not None and next_read <= now and next_read < self.end_s:
                self._dispatch(self._read_job(next_read))
                next_read += read_period
            if now >= self.end_s:
                if self.phase == "load":
                    self.phase = "drain"
                    # scheduled sends past the end (a stop, or first sends beyond a short run)
                    # are dropped at once; retries and resends stay and drain
                    heap[:] = [entry for entry in heap if entry[3] is not None]
                    heapq.heapify(heap)
                if (not heap and self.inflight == 0) or now >= self.end_s + cfg.drain_s:
                    return
            wake = heap[0][0] if heap else now + 0.05
            if read_period is not None and next_read < self.end_s:
                wake = min(wake, next_read)
            gevent.sleep(max(TICK_S, min(wake - now, 0.05)))

    def _drain(self) -> int:
        """Give up on retries still scheduled and wait for the sends in flight; the number abandoned."""
        abandoned = len(self.heap)
        if abandoned:
            self.stats.count("abandoned_retries", abandoned)
        wait_until = time.perf_counter() + self.cfg.timeout_s + 1
        while self.inflight and time.perf_counter() < wait_until:
            gevent.sleep(0.05)
        return abandoned

    def _stop(self, helpers: list[gevent.Greenlet]) -> None:
        for _ in self.workers:
            self.queue.put(None)
        gevent.joinall(self.workers, timeout=2)
        gevent.killall(self.workers, block=False)
        gevent.killall(helpers, block=False)
        for conn in self.device_conns:
            if conn is not None:
                conn.close()

    def _result(self, usage0: Any, usage1: Any, wall_s: float, abandoned: int, started_at: str,
                gc_max_pause_s: float) -> RunResult:
        versions: dict[str, int] = {}
        for d in self.devices:
            versions[d.app_version] = versions.get(d.app_version, 0) + 1
        merge(self.lag, self.lag_window)
        connections = len(self.workers) + self.peak_conns
        return RunResult(
            stats=self.stats, series=self.series, acked=self.acked,
            lag_ms=percentiles_ms(self.lag), pool_samples=self.pool_samples,
            db_cpu_samples=self.db_cpu_samples, db_cpu_source=self.db_cpu_source,
            cpu_s=(usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
            cpu_sys_s=usage1.ru_stime - usage0.ru_stime,
            wall_s=wall_s, rss_mb=round(usage1.ru_maxrss / 1024, 1), connections=connections,
            abandoned=abandoned, started_at=started_at, finished_at=datetime.now(UTC).isoformat(),
            versions=versions, gc_max_pause_ms=round(gc_max_pause_s * 1000, 2),
            load_s=min(self.end_s, self.cfg.duration_s), connects=self.connects,
        )

    # -- scheduling -------------------------------------------------------------------------
    def _push(self, due_s: float, device: Device | None, job: Job | None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (due_s, self.seq, device, job))

    def _dispatch(self, job: Job) -> None:
        self.inflight += 1
        mode = self.cfg.connection_mode
        if job.device is None or mode == POOLED:  # reads always share the pool (an operator's client)
            self.queue.put(job)
            if self.queue.qsize() > self.idle:
                if len(self.workers) < self.cfg.max_connections:
                    self.workers.append(gevent.spawn(self._worker))
                else:
                    self.stats.count("queued_at_connection_limit")
            return
        index = job.device.index
        if mode == PER_DEVICE and not self.device_busy[index]:
            conn = self.device_conns[index]
            if conn is None:
                conn = self.device_conns[index] = self._open()
            self.device_busy[index] = 1
            gevent.spawn_raw(self._send_own, conn, job, index)
        else:  # a new connection: every heartbeat, or a device whose own one is busy
            gevent.spawn_raw(self._send_once, self._open(), job)

    def _count_connect(self) -> None:
        self.connects += 1

    def _open(self) -> Any:
        conn = connect(self.cfg.client, self.cfg.url, self.cfg.timeout_s, self._count_connect)
        self.open_conns += 1
        if self.open_conns > self.peak_conns:
            self.peak_conns = self.open_conns
        return conn

    def _tick(self, device: Device, due_s: float) -> None:
        """A device's scheduled send comes due."""
        if due_s >= self.end_s:
            return  # planned past the end (a first send of a long interval, or a stop)
        nxt = next_send_s(due_s, self.cfg.interval_s, self.cfg.jitter_s, self.rng)
        if nxt < self.end_s:
            self._push(nxt, device, None)
        if device.is_offline(due_s):
            self.stats.count("skipped_offline")
            return
        if self.outage is not None and self.outage.silences(device.index, due_s):
            self.stats.count("skipped_outage")
            return
        if device.maybe_go_offline(self.behaviour, due_s, self.rng):
            self.went_offline_ids.add(device.device_id)
            self.stats.count("went_offline")
            self.stats.count("skipped_offline")
            return
        device.advance(self.behaviour, due_s, self.rng)
        self._dispatch(Job(device, due_s, device.loses_answer(self.behaviour, self.rng)))

    def _read_job(self, intended_s: float) -> Job:
        device = self.devices[self.rng.randrange(len(self.devices))]
        endpoint, path = self.behaviour.read_mix.pick(device.device_id, self.rng)
        return Job(None, intended_s, path=path, endpoint=endpoint)

    # -- sending ----------------------------------------------------------------------------
    def _worker(self) -> None:
        conn = connect(self.cfg.client, self.cfg.url, self.cfg.timeout_s, self._count_connect)
        reads: Any = None  # the worker's connection to the operator plane, opened on its first read
        queue = self.queue
        try:
            while True:
                self.idle += 1
                job = queue.get()
                self.idle -= 1
                if job is None:
                    return
                if job.device is None:
                    if reads is None:
                        reads = connect(self.cfg.client, self.cfg.operator_url, self.cfg.timeout_s)
                    self._send(reads, job)
                else:
                    self._send(conn, job)
        finally:
            conn.close()
            if reads is not None:
                reads.close()

    def _send_own(self, conn: Any, job: Job, index: int) -> None:
        """A send on the device's own keep-alive connection."""
        try:
            self._send(conn, job)
        finally:
            self.device_busy[index] = 0

    def _send_once(self, conn: Any, job: Job) -> None:
        """A send on a connection of its own, closed afterwards."""
        try:
            self._send(conn, job)
        finally:
            self.open_conns -= 1
            conn.close()

    def _send(self, conn: Any, job: Job) -> None:
        try:
            if job.device is None:
                self._send_read(conn, job)
            else:
                self._send_heartbeat(conn, job)
        except Exception as exc:  # a generator bug must show in the report, not kill the sender
            self.stats.record("heartbeat" if job.device else "read", 0, f"generator:{type(exc).__name__}")
        finally:
            self.inflight -= 1

    def _send_heartbeat(self, conn: Any, job: Job) -> None:
        t0 = self.t0
        start = time.perf_counter()
        record_us(self.lag_window, int((start - t0 - job.due_s) * 1e6))
        device = job.device
        if job.body is None:
            if device.clock_offset_s:
                job.body = device.body(self.skewed_clock.now_iso(time.time() + device.clock_offset_s))
            else:
                job.body = device.body(self.clock.now_iso())
        self.stats.sent_one()
        headers = device.auth_header + self.hb_headers_extra if self.hb_headers_extra else device.auth_header
        try:
            answer = conn.request(b"POST", b"/v1/heartbeat", headers, job.body)
        except TransportError as exc:
            self._failed(job, exc.kind, None, time.perf_counter())
            return
        end = time.perf_counter()
        if answer.status != 200:
            self._failed(job, f"http_{answer.status}", answer.retry_after_s, end)
            return
        try:
            ack = _decode_ack(answer.body)
        except msgspec.MsgspecError:
            self._failed(job, "bad_answer", None, end)
            return
        stats = self.stats
        stats.record("heartbeat", int((end - t0 - job.intended_s) * 1e6))
        acked = self.acked.get(device.device_id)
        if acked is None:
            acked = self.acked[device.device_id] = array("q")  # 8 bytes a bucket, for long runs
        acked.append(int(ack.bucket_ts.timestamp()))
        stats.count(ack.status)
        if job.resend_of is not None:
            stats.count(f"resend_answered_{ack.status}")
            if job.resend_of == "stored" and ack.status == "stored":
                stats.count("stored_twice")
        elif ack.status == "duplicate":
            stats.count("first_send_duplicate")
        if job.lose_answer:
            stats.count("lost_answer_resends")
            resend = Job(device, end - t0 + resend_delay_s(self.cfg.interval_s, self.rng), body=job.body,
                         resend_of=ack.status)
            self._push(resend.intended_s, device, resend)

    def _failed(self, job: Job, kind: str, retry_after_s: float | None, end: float) -> None:
        kind_of = "heartbeat" if job.device is not None else "read"
        self.stats.record(kind_of, int((end - self.t0 - job.intended_s) * 1e6), kind)
        if job.device is None:
            self.stats.record(f"read:{job.endpoint}", 0, kind)
        if job.device is None or not is_retryable(kind):
            return
        job.attempt += 1
        if job.attempt > self.cfg.max_retries:
            self.stats.count("gave_up")
            return
        self.stats.count("retries")
        job.due_s = end - self.t0 + retry_delay_s(job.attempt, retry_after_s, self.rng)
        self._push(job.due_s, job.device, job)

    def _send_read(self, conn: Any, job: Job) -> None:
        start = time.perf_counter()
        record_us(self.lag_window, int((start - self.t0 - job.due_s) * 1e6))
        try:
            answer = conn.request(b"GET", job.path, self.admin_headers, None)
        except TransportError as exc:
            self._failed(job, exc.kind, None, time.perf_counter())
            return
        end = time.perf_counter()
        if answer.status != 200:
            self._failed(job, f"http_{answer.status}", answer.retry_after_s, end)
            return
        latency_us = int((end - self.t0 - job.intended_s) * 1e6)
        self.stats.record("read", latency_us)
        self.stats.record(f"read:{job.endpoint}", latency_us)

    # -- once a second ------------------------------------------------------------------------
    def _sampler(self) -> None:
        k = 1
        while True:
            gevent.sleep(max(0.0, self.t0 + k - time.perf_counter()))
            self._sample()
            k += 1

    def _sample(self, final: bool = False) -> None:
        stats = self.stats
        window = stats.kinds["heartbeat"].roll_window()
        read_window = stats.kinds["read"].roll_window()
        for name, kind in stats.kinds.items():
            if name.startswith("read:"):
                kind.roll_window()
        lag_window = percentiles_ms(self.lag_window)
        merge(self.lag, self.lag_window)
        self.lag_window = new_histogram()
        sent_window, stats.window_sent = stats.window_sent, 0
        snapshot = rep.progress_snapshot(
            stats, window, read_window, sent_window, lag_window["p99"], self.pool_samples, self.cfg.targets,
            db_cpu=rep.db_cpu_pct(self.db_cpu_samples),
            t_s=round(time.perf_counter() - self.t0, 3), phase="final" if final else self.phase,
            expected_per_s=self.cfg.expected_per_s, in_flight=self.inflight,
            connections=len(self.workers) + self.open_conns, pool_latest=self.pool_latest,
        )
        if not final:
            self.series.append(snapshot)
            self.emit(snapshot)

    def _pool_poller(self) -> None:
        api = AdminApi(self.cfg.operator_url, self.cfg.admin_key, timeout_s=5)
        try:
            while True:
                gevent.sleep(1.0)
                try:
                    status, body = api.call("GET", "/ops/pool_health")
                except UsageError:
                    continue
                if status == 404:
                    return  # this server has no pool figures: the SLI shows N/A
                if status != 200:
                    continue
                health = msgspec.convert(body, PoolHealth)  # the server's schema: a renamed field fails here
                cpu = health.postgres_cpu
                if cpu is not None:
                    self.db_cpu_samples.append((time.monotonic(), cpu.seconds, cpu.host_cpus))
                    self.db_cpu_source = cpu.source
                elif health.postgres_cpu_note:
                    self.db_cpu_source = "not measured: " + health.postgres_cpu_note
                self.pool_latest = health.utilization_pct
                self.pool_samples.append(health.utilization_pct)
        finally:
            api.close()


def run_load_test(cfg: SimConfig, emit: Callable[[dict[str, Any]], None], stream: TextIO = sys.stderr,
                  on_start: Callable[[LoadRun], None] | None = None) -> dict[str, Any]:
    """Check the server, enroll, run the load, check for loss; the report dict.
    ``on_start`` receives the LoadRun (to stop it early from a signal handler)."""
    cfg.validate()
    api = AdminApi(cfg.operator_url, cfg.admin_key)
    try:
        check_server(api, cfg.url)
        cache = cfg.token_cache or default_token_cache(cfg.url)
        fleet = enroll_fleet(api, cfg.devices, cache, cfg.enroll_batch, stream, cfg.show_progress)
        load = LoadRun(cfg, fleet, emit)
        if on_start:
            on_start(load)
        run = load.run()
        no_loss = verify_no_loss(api, run.acked, cfg.verify_sample, stream, cfg.show_progress)
        outage = None
        if load.outage is not None:
            outage = check_outage(api, load.outage, datetime.fromisoformat(run.started_at), run.load_s,
                                  [d.device_id for d in load.devices], load.went_offline_ids, cfg.outage_grace_s)
    finally:
        api.close()
    report = rep.build_report(cfg, run, no_loss)
    if outage is not None:
        rep.add_outage_check(report, outage)
    return report
