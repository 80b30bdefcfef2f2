"""The partitions job: converge on "today and the next PARTITION_PREMAKE_DAYS days exist".

There is no default partition, on purpose: rows in a default partition block creating any
partition whose range overlaps them, and a day's rows could then no longer be archived as one
table. A heartbeat's bucket is always within MAX_CLOCK_SKEW_SECONDS of the server's clock
(api/heartbeat_parsing.py), so it can only fall outside every partition when this job has not run for
days; then the writer creates that day's partition itself and retries (db.ingest.IngestConnection).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import Connection, Engine

from db.events import maintain_event_partitions
from db.partitions import PartitionSpec, create_partition, list_partitions, lock_partition_ddl, plan_partitions
from db.webhooks import prune_deliveries
from scheduler.locking import JobOutcome, Progress

__all__ = ["apply_partitions", "plan_partitions", "run_partitions"]


def list_default_partitions(conn: Connection) -> list[str]:
    """Default partitions of heartbeats (there should be none; someone made one by hand)."""
    rows = conn.exec_driver_sql(
        """
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = 'heartbeats' AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'
        """
    ).fetchall()
    return [r[0] for r in rows]


def apply_partitions(conn: Connection, plan: list[PartitionSpec], progress: Progress) -> list[str]:
    """Create the planned partitions (idempotent) and record them in hb_partitions. Caller commits."""
    for spec in plan:
        create_partition(conn, spec)
        progress(f"created {spec.name} [{spec.range_start:%Y-%m-%d}, {spec.range_end:%Y-%m-%d})")
    return [spec.name for spec in plan]


def run_partitions(engine: Engine, *, today: date, premake_days: int, progress: Progress,
                   events_retention_days: int | None = None, deliveries_keep_days: int | None = None) -> JobOutcome:
    """The partitions job body: plan against what exists, create what is missing; the same for
    the events table, whose days past ``events_retention_days`` are dropped (None: none); and
    finished webhook deliveries older than ``deliveries_keep_days`` are deleted."""
    with engine.begin() as conn:
        lock_partition_ddl(conn)  # as db.partitions.ensure_partitions (start-up, ingest on demand)
        existing = list_partitions(conn)
        plan = plan_partitions(existing, today, premake_days)
        progress(f"{len(existing)} partitions attached; {len(plan)} to create "
                 f"(today {today} + {premake_days} days ahead)")
        created = apply_partitions(conn, plan, progress)
        defaults = list_default_partitions(conn)
        events_created, events_dropped = maintain_event_partitions(conn, today, premake_days, events_retention_days)
        pruned = 0
        if deliveries_keep_days is not None:
            cutoff = datetime.combine(today - timedelta(days=deliveries_keep_days), time(0), tzinfo=UTC)
            pruned = prune_deliveries(conn, cutoff)
    if events_created or events_dropped:
        progress(f"events partitions: created {events_created}, dropped past retention {events_dropped}")
    detail: dict = {"created": created, "attached": len(existing) + len(created), "today": today.isoformat(),
                    "events_created": events_created, "events_dropped": events_dropped,
                    "webhook_deliveries_pruned": pruned}
    if defaults:
        detail["default_partitions"] = defaults
        progress(f"WARNING: default partition(s) {defaults} exist; rows there block overlapping partitions")
    return JobOutcome(rows_affected=len(created), detail=detail)
