"""The last minutes of what the console has seen, for sparklines and the latency chart."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from console.sources.server import ServerSnapshot
from console.sources.simulator import SimProgress

HISTORY_POINTS = 600  # ten minutes at the default one poll a second


@dataclass(frozen=True)
class LatencyPoint:
    """Heartbeat latency percentiles at one moment, in ms (None: no observations then)."""

    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    p999_ms: float | None


class History:
    """Bounded series: pool utilisation, latency percentiles (server and simulator), throughput."""

    def __init__(self, points: int = HISTORY_POINTS) -> None:
        self.pool_pct: deque[float] = deque(maxlen=points)
        self.server_latency: deque[LatencyPoint] = deque(maxlen=points)
        self.sim_latency: deque[LatencyPoint] = deque(maxlen=points)
        self.heartbeats_per_s: deque[float] = deque(maxlen=points)

    def add_server(self, snap: ServerSnapshot) -> None:
        """Append what one poll measured (nothing for what it could not read)."""
        if snap.pool.ok and snap.pool.value is not None:
            self.pool_pct.append(snap.pool.value.utilization_pct)
        traffic = snap.traffic.value if snap.traffic.ok else None
        if traffic is not None:
            self.server_latency.append(LatencyPoint(traffic.p50_ms, traffic.p95_ms, traffic.p99_ms, traffic.p999_ms))
            if traffic.heartbeats_per_s is not None:
                self.heartbeats_per_s.append(traffic.heartbeats_per_s)

    def add_simulator(self, progress: SimProgress) -> None:
        """Append one simulator progress line."""
        self.sim_latency.append(LatencyPoint(progress.p50_ms, progress.p95_ms, progress.p99_ms, progress.p999_ms))

    def clear_simulator(self) -> None:
        """Forget the previous run's series (a new run starts)."""
        self.sim_latency.clear()
