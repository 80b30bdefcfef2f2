"""Pool health of the whole server: every worker's pool (from the multiprocess gauges) and
PostgreSQL's connection limit, judged OK / WARN (> 80 %) / CRITICAL (> 95 %).

The figures are plain data here; api/routes/observability.py serves them and
``python -m api.pool_monitor`` prints them.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

import msgspec
from msgspec import Struct
from sqlalchemy.pool import Pool, QueuePool

from api.metrics import PREFIX, live_gauge_values, live_gauge_values_by_plane
from db.connections import ConnectionUse

WARN_PCT = 80.0
CRITICAL_PCT = 95.0
Status = Literal["OK", "WARN", "CRITICAL"]
_RANK = {"OK": 0, "WARN": 1, "CRITICAL": 2}


class PoolFigures(Struct):
    """Every live worker's pool, summed; utilisation = in use / (size + max overflow)."""

    workers: int
    pool_size: int
    max_overflow: int
    capacity: int
    in_use: int
    overflow: int
    utilization_pct: float
    busiest_worker_utilization_pct: float


class PostgresFigures(Struct):
    max_connections: int
    reserved_connections: int
    in_use: int
    in_use_by_nexmdm: int
    headroom: int
    utilization_pct: float


class PoolHealth(PoolFigures):
    """GET /ops/pool_health: the pool figures of every live worker of both planes (PoolFigures'
    fields), each plane's (``planes``), then PostgreSQL's, then the judgement."""

    planes: dict[str, PoolFigures]
    status: Status
    reasons: list[str]
    postgres: PostgresFigures | None
    postgres_error: str | None
    warn_pct: float
    critical_pct: float
    as_of: datetime


def judge(utilization_pct: float) -> Status:
    """OK up to 80 %, WARN above, CRITICAL above 95 %."""
    if utilization_pct > CRITICAL_PCT:
        return "CRITICAL"
    if utilization_pct > WARN_PCT:
        return "WARN"
    return "OK"


def _pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole > 0 else 0.0


def figures_from_gauges(values: dict[str, float]) -> PoolFigures:
    """PoolFigures from the whole-server gauge values (api.metrics.live_gauge_values)."""
    size = int(values.get(f"{PREFIX}_db_pool_size_connections", 0))
    max_overflow = int(values.get(f"{PREFIX}_db_pool_max_overflow_connections", 0))
    in_use = int(values.get(f"{PREFIX}_db_pool_checked_out_connections", 0))
    return PoolFigures(
        workers=int(values.get(f"{PREFIX}_worker_processes", 0)),
        pool_size=size,
        max_overflow=max_overflow,
        capacity=size + max_overflow,
        in_use=in_use,
        overflow=int(values.get(f"{PREFIX}_db_pool_overflow_connections", 0)),
        utilization_pct=_pct(in_use, size + max_overflow),
        busiest_worker_utilization_pct=round(100.0 * values.get(f"{PREFIX}_db_pool_utilization_ratio", 0.0), 1),
    )


def figures_from_pool(pool: Pool) -> PoolFigures:
    """PoolFigures of one process's pool (no multiprocess directory: this process is the server)."""
    if not isinstance(pool, QueuePool):
        return PoolFigures(1, 0, 0, 0, 0, 0, 0.0, 0.0)
    size, max_overflow = pool.size(), max(0, pool._max_overflow)  # noqa: SLF001 - no public getter
    in_use = pool.checkedout()
    pct = _pct(in_use, size + max_overflow)
    return PoolFigures(1, size, max_overflow, size + max_overflow, in_use, max(0, pool.overflow()), pct, pct)


def server_pool_figures(multiproc_dir: Path | None, pool: Pool) -> PoolFigures:
    """The whole server's pool figures: every worker's gauges, or this process's pool."""
    if multiproc_dir is not None:
        return figures_from_gauges(live_gauge_values(multiproc_dir))
    return figures_from_pool(pool)


def plane_pool_figures(multiproc_dir: Path | None, pool: Pool, plane: str) -> dict[str, PoolFigures]:
    """Each plane's pool figures (device, operator; all when one process serves both): from the
    workers' gauges, or this process's pool as ``plane``."""
    if multiproc_dir is not None:
        return {name: figures_from_gauges(values)
                for name, values in sorted(live_gauge_values_by_plane(multiproc_dir).items())}
    return {plane: figures_from_pool(pool)}


def postgres_figures(use: ConnectionUse) -> PostgresFigures:
    return PostgresFigures(
        max_connections=use.max_connections,
        reserved_connections=use.reserved_connections,
        in_use=use.in_use,
        in_use_by_nexmdm=use.in_use_by_nexmdm,
        headroom=use.headroom,
        utilization_pct=_pct(use.in_use, use.available),
    )


def assess(
    pool: PoolFigures, postgres: PostgresFigures | None, postgres_error: str | None, now: datetime,
    planes: dict[str, PoolFigures] | None = None,
) -> PoolHealth:
    """Judge the figures. The status is the worst of: the busiest worker's pool (a worker whose
    pool runs out fails its requests even when the others idle), PostgreSQL's connection use,
    and PostgreSQL being unreachable (CRITICAL)."""
    status: Status = "OK"
    reasons: list[str] = []

    def worse(candidate: Status, reason: str) -> None:
        nonlocal status
        if candidate != "OK":
            reasons.append(f"{candidate}: {reason}")
            if _RANK[candidate] > _RANK[status]:
                status = candidate

    by_plane = planes or {}
    busiest = max(by_plane, key=lambda p: by_plane[p].busiest_worker_utilization_pct, default=None)
    where = f" of the {busiest} plane" if busiest and len(by_plane) > 1 else ""
    worse(judge(pool.busiest_worker_utilization_pct),
          f"pool utilisation {pool.busiest_worker_utilization_pct} % in the busiest worker{where} "
          f"({pool.utilization_pct} % over {pool.workers} workers)")
    if postgres is None:
        worse("CRITICAL", f"PostgreSQL connection figures unavailable: {postgres_error}")
    else:
        worse(judge(postgres.utilization_pct),
              f"PostgreSQL connections {postgres.in_use} of {postgres.max_connections - postgres.reserved_connections}"
              f" ({postgres.utilization_pct} %)")
        available = postgres.max_connections - postgres.reserved_connections
        if pool.capacity > available:
            worse("WARN", f"the pools of all workers may open {pool.capacity} connections, "
                          f"more than the {available} PostgreSQL allows")
    return PoolHealth(
        **msgspec.structs.asdict(pool), planes=by_plane, status=status, reasons=reasons, postgres=postgres,
        postgres_error=postgres_error, warn_pct=WARN_PCT, critical_pct=CRITICAL_PCT, as_of=now,
    )
