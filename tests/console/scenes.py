"""Deterministic data for the console's snapshot tests: fixed polls and a fixed simulator run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from api import contract
from api.schemas import PoolFigures, PoolHealth
from console.sources.metrics import diff_metrics, parse_metrics
from console.sources.server import FleetSummary, JobRun, Reading, ServerSnapshot
from console.sources.simulator import SimProgress

T0 = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
HIST = contract.HEARTBEAT_WRITE_SECONDS  # the server's own names: the scenes decode what it exports
EDGES = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


def metrics_text(step: int) -> str:
    """A /metrics page after ``step`` seconds of a steady, slowly degrading load."""
    slow = min(step, 150) / 150  # the load slowly pushes latency towards the SLO lines
    weights = (30, 30, 20, 10, 5, 2 + 4 * slow, 1.5 + 2 * slow, 0.8 + 1.5 * slow, 0.3 + slow, 0.05, 0.01)
    shares = [w / sum(weights) for w in weights]
    total = 200.0 * step
    lines = [
        f"# HELP {HIST} Heartbeat write latency.",
        f"# TYPE {HIST} histogram",
    ]
    cumulative = 0.0
    for edge, share in zip(EDGES, shares, strict=True):
        cumulative += total * share
        lines.append(f'{HIST}_bucket{{le="{edge}"}} {cumulative:.3f}')
    lines += [
        f'{HIST}_bucket{{le="+Inf"}} {total:.0f}',
        f"{HIST}_count {total:.0f}",
        f"{HIST}_sum {total * 0.03:.3f}",
        f"# TYPE {contract.HEARTBEATS_ACCEPTED} counter",
        f"{contract.HEARTBEATS_ACCEPTED} {total * 0.99:.0f}",
        f"# TYPE {contract.HEARTBEATS_DUPLICATE} counter",
        f"{contract.HEARTBEATS_DUPLICATE} {total * 0.01:.0f}",
        f"# TYPE {contract.HEARTBEATS_REJECTED} counter",
        f'{contract.HEARTBEATS_REJECTED}{{reason="token_invalid"}} {step * 0.4:.0f}',
    ]
    return "\n".join(lines) + "\n"


def polls(n: int = 60) -> list[ServerSnapshot]:
    """``n`` one-second polls of a healthy server whose pool fills up over the minute."""
    snapshots = []
    previous = None
    for step in range(1, n + 1):
        sample = parse_metrics(metrics_text(step * 3), float(step))
        traffic = diff_metrics(previous, sample)
        previous = sample
        in_use = min(100, 20 + step * 3 // 4)
        pct = 100.0 * in_use / 100
        at = T0 + timedelta(seconds=step)
        figures = PoolFigures(workers=2, pool_size=50, max_overflow=50, capacity=100, in_use=in_use,
                              overflow=max(0, in_use - 50), utilization_pct=pct, busiest_worker_utilization_pct=pct)
        snapshots.append(ServerSnapshot(
            polled_at=at,
            duration_s=0.01,
            status="ok",
            message="",
            pool=Reading(PoolHealth(
                **msgspec.structs.asdict(figures), planes={"all": figures}, pool=figures,
                status=contract.pool_status(pct), reasons=[], postgres=None, postgres_error=None, postgres_cpu=None,
                postgres_cpu_note=None, warn_pct=contract.POOL_WARN_PCT, critical_pct=contract.POOL_CRITICAL_PCT,
                as_of=at,
            )),
            traffic=Reading(traffic) if traffic else Reading(message="waiting for a second scrape"),
            jobs=Reading({
                "partitions": JobRun("partitions", "succeeded", at - timedelta(minutes=5),
                                     at - timedelta(minutes=5) + timedelta(seconds=1), "0 created"),
                "nightly": JobRun("nightly", "failed", at - timedelta(hours=9), at - timedelta(hours=9),
                                  "archive checksum mismatch"),
            }),
            fleet=Reading(FleetSummary(2000, 1990, 10, 37, {"1.4.0": 1500, "1.3.9": 500})),
        ))
    return snapshots


def sim_progress(n: int = 20) -> list[SimProgress]:
    """``n`` seconds of a simulator run at 200 heartbeats/s."""
    return [
        SimProgress(t_s=float(i), sent=200 * i, acked=200 * i - (i // 5), errors=i // 5, rate_per_s=200.0,
                    p50_ms=8.0 + i * 0.1, p95_ms=40.0 + i, p99_ms=90.0 + 3 * i, p999_ms=180.0 + 8 * i)
        for i in range(1, n + 1)
    ]


def down_snapshot() -> ServerSnapshot:
    """A poll that found nothing listening."""
    down: Reading = Reading(kind="down", message="server down")
    return ServerSnapshot(T0, 0.001, "down", "no answer at http://127.0.0.1:8000: connection refused",
                          down, down, down, down)
