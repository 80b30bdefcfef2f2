"""The events job: every EVENTS_INTERVAL_S, record each device's transitions since the last run.

Runs under the job's advisory lock (scheduler/locking.py), never on the heartbeat path: one
statement compares the whole fleet with what the previous run saw (db/events.py) and writes the
events and the new state in one transaction. A burst (a carrier outage silencing 15,000 devices)
is one run's ordinary work. Webhook deliveries are built from the events afterwards, off this
transaction (scheduler/jobs/webhooks.py).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine

from config.settings import Settings
from db.events import Thresholds, derive_events, event_partition_name, list_event_partitions, maintain_event_partitions
from scheduler.locking import JobOutcome, Progress


def thresholds_of(settings: Settings) -> Thresholds:
    """The event thresholds configured in ``settings``."""
    return Thresholds(
        offline_after_s=settings.offline_after_seconds,
        battery_low_pct=settings.battery_low_pct,
        battery_critical_pct=settings.battery_critical_pct,
        battery_hysteresis_pct=settings.battery_hysteresis_pct,
    )


def run_events(engine: Engine, settings: Settings, *, now: datetime, progress: Progress) -> JobOutcome:
    """The events job body: derive and record every transition as of ``now``."""
    now = now.astimezone(UTC)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(settings.job_statement_timeout_ms)}")
        if event_partition_name(now.date()) not in list_event_partitions(conn):
            # The partitions job makes days ahead; this covers a database it has not reached yet.
            maintain_event_partitions(conn, now.date(), 0, None)
        derived = derive_events(conn, thresholds_of(settings), now)
    if derived.total:
        progress(f"{derived.total:,} events: " + ", ".join(f"{t} {n:,}" for t, n in sorted(derived.by_type.items())))
    return JobOutcome(rows_affected=derived.total,
                      detail={"events": derived.by_type, "state_rows": derived.state_rows, "as_of": now.isoformat()})

