"""Pool health of the whole server: every worker's pool (from the multiprocess gauges) and
PostgreSQL's connection limit, judged OK / WARN (> 80 %) / CRITICAL (> 95 %). The answer's
schema is in api/schemas.py and the thresholds in api/contract.py (clients decode with them).

The figures are plain data here; api/routes/observability.py serves them and
``python -m api.pool_monitor`` prints them.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import msgspec
import psutil
from sqlalchemy.pool import Pool, QueuePool

from api.contract import POOL_CRITICAL_PCT, POOL_WARN_PCT, PoolStatus, pool_status
from api.metrics import PREFIX, live_gauge_values, live_gauge_values_by_plane
from api.schemas import PoolFigures, PoolHealth, PostgresCpu, PostgresFigures
from db.connections import ConnectionUse

_RANK = {"OK": 0, "WARN": 1, "CRITICAL": 2}


LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def local_postgres_cpu(host: str | None, backend_pid: int | None) -> tuple[PostgresCpu | None, str | None]:
    """PostgreSQL's CPU seconds when it runs on this host, else (None, why not). ``backend_pid``:
    one of its backends (pg_backend_pid() of our connection), whose parent is the postmaster."""
    if host not in LOCAL_HOSTS or backend_pid is None:
        return None, ("the database is not on this host: PostgreSQL itself reports no CPU figure "
                      "(see its host's monitoring)")
    try:
        postmaster = psutil.Process(backend_pid).parent()
        if postmaster is None or postmaster.name() != "postgres":
            return None, f"backend {backend_pid} has no postgres parent on this host"
        with postmaster.oneshot():
            own = postmaster.cpu_times()
            # Its reaped backends' CPU is in children_*; the live ones are added below.
            total = own.user + own.system + own.children_user + own.children_system
        for child in postmaster.children():
            try:
                times = child.cpu_times()
                total += times.user + times.system
            except psutil.Error:  # exited meanwhile: now in the postmaster's children_* times
                continue
    except psutil.Error as exc:
        return None, f"PostgreSQL's processes could not be read here: {exc}"
    source = f"local processes (postmaster pid {postmaster.pid} and its children)"
    return PostgresCpu(round(total, 2), psutil.cpu_count() or 1, source), None


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
    cpu: tuple[PostgresCpu | None, str | None] = (None, None),
) -> PoolHealth:
    """Judge the figures. The status is the worst of: the busiest worker's pool (a worker whose
    pool runs out fails its requests even when the others idle), PostgreSQL's connection use,
    and PostgreSQL being unreachable (CRITICAL)."""
    status: PoolStatus = "OK"
    reasons: list[str] = []

    def worse(candidate: PoolStatus, reason: str) -> None:
        nonlocal status
        if candidate != "OK":
            reasons.append(f"{candidate}: {reason}")
            if _RANK[candidate] > _RANK[status]:
                status = candidate

    by_plane = planes or {}
    busiest = max(by_plane, key=lambda p: by_plane[p].busiest_worker_utilization_pct, default=None)
    where = f" of the {busiest} plane" if busiest and len(by_plane) > 1 else ""
    worse(pool_status(pool.busiest_worker_utilization_pct),
          f"pool utilisation {pool.busiest_worker_utilization_pct} % in the busiest worker{where} "
          f"({pool.utilization_pct} % over {pool.workers} workers)")
    if postgres is None:
        worse("CRITICAL", f"PostgreSQL connection figures unavailable: {postgres_error}")
    else:
        worse(pool_status(postgres.utilization_pct),
              f"PostgreSQL connections {postgres.in_use} of {postgres.max_connections - postgres.reserved_connections}"
              f" ({postgres.utilization_pct} %)")
        available = postgres.max_connections - postgres.reserved_connections
        if pool.capacity > available:
            worse("WARN", f"the pools of all workers may open {pool.capacity} connections, "
                          f"more than the {available} PostgreSQL allows")
    return PoolHealth(
        **msgspec.structs.asdict(pool), planes=by_plane, pool=pool, status=status, reasons=reasons,
        postgres=postgres, postgres_error=postgres_error, postgres_cpu=cpu[0], postgres_cpu_note=cpu[1],
        warn_pct=POOL_WARN_PCT, critical_pct=POOL_CRITICAL_PCT, as_of=now,
    )
