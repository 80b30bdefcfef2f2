"""A device's history across both tiers: hot days from PostgreSQL, cold days from Parquet."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection

from db.cold import ColdReader, list_cold_days
from db.heartbeats import list_heartbeats

T = TypeVar("T")
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class HistoryPage:
    """One page of history, and the range that continues it (None when there is no more)."""

    rows: list[dict[str, Any]]
    next_since: datetime | None
    next_until: datetime | None


def _run_here(fn: Callable[[], T]) -> T:
    return fn()


def list_history(
    conn: Connection, cold: ColdReader | None, device_id: int, since: datetime, until: datetime, limit: int,
    newest_first: bool = True, offload: Callable[[Callable[[], Any]], Any] = _run_here,
) -> HistoryPage:
    """Up to ``limit`` heartbeats of a device with since <= bucket_ts < until from both tiers,
    newest (or oldest) first, each once.

    PostgreSQL is read first, then hb_partitions for the cold days in range: a day the nightly
    job moves in between is then seen in both (and de-duplicated by its key), never in neither.
    When the hot rows fill the page, only cold days that could still beat them are read.
    ``offload`` runs the DuckDB read (the API passes a thread pool under gevent)."""
    hot = list_heartbeats(conn, device_id, since, until, limit, newest_first=newest_first)
    cold_since, cold_until = since, until
    if len(hot) == limit:
        edge = hot[-1]["bucket_ts"]
        if newest_first:
            cold_since = max(since, edge)
        else:
            cold_until = min(until, edge + _MICROSECOND)
    cold_rows: list[dict[str, Any]] = []
    if cold is not None and cold_since < cold_until:
        days = list_cold_days(conn, cold_since, cold_until)
        if days:
            cold_rows = offload(lambda: cold.read(device_id, cold_since, cold_until, days, limit, newest_first))
    if cold_rows:
        merged = {r["bucket_ts"]: r for r in cold_rows}
        merged.update((r["bucket_ts"], r) for r in hot)  # a day in both tiers: one row per key
        rows = sorted(merged.values(), key=lambda r: r["bucket_ts"], reverse=newest_first)[:limit]
    else:
        rows = hot
    if len(rows) < limit:
        return HistoryPage(rows, None, None)
    last = rows[-1]["bucket_ts"]
    if newest_first:
        return HistoryPage(rows, since, last)
    return HistoryPage(rows, last + _MICROSECOND, until)
