"""A device's history across both tiers: hot days from PostgreSQL, cold days from Parquet."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection

from db.cold import ColdDay, ColdReader, list_cold_days
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

    The tier at the start of the order is read first, and the other only over what could
    still make the page: newest first, PostgreSQL (the recent days) then the cold days;
    oldest first, the cold days then PostgreSQL. Either way hb_partitions is read (again)
    after PostgreSQL, so a day the nightly job moves meanwhile is seen in both tiers (and
    de-duplicated by its key) or in the cold one, never in neither. ``offload`` runs the
    DuckDB read (the API passes a thread pool under gevent)."""
    def read_cold(days: list[ColdDay], lo: datetime, hi: datetime) -> list[dict[str, Any]]:
        if cold is None or not days or lo >= hi:
            return []
        return offload(lambda: cold.read(device_id, lo, hi, days, limit, newest_first))

    def cold_days(lo: datetime, hi: datetime) -> list[ColdDay]:
        return list_cold_days(conn, lo, hi) if cold is not None and lo < hi else []

    if newest_first:
        hot = list_heartbeats(conn, device_id, since, until, limit, newest_first=True)
        cold_since = max(since, hot[-1]["bucket_ts"]) if len(hot) == limit else since
        cold_rows = read_cold(cold_days(cold_since, until), cold_since, until)
    else:
        seen = cold_days(since, until)
        cold_rows = read_cold(seen, since, until)
        hot_until = min(until, cold_rows[-1]["bucket_ts"] + _MICROSECOND) if len(cold_rows) == limit else until
        hot = list_heartbeats(conn, device_id, since, hot_until, limit, newest_first=False)
        known = {d.day for d in seen}
        moved = [d for d in cold_days(since, hot_until) if d.day not in known]  # archived since `seen`
        cold_rows += read_cold(moved, since, hot_until)
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
