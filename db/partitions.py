"""Daily partitions of the heartbeats table: plan (pure) and apply (idempotent)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import Connection

# ASCII digits only, the whole name (\d would take other scripts' digits, $ a trailing newline)
NAME_RE = re.compile(r"heartbeats_p([0-9]{8})")


@dataclass(frozen=True)
class PartitionSpec:
    name: str
    day: date

    @property
    def range_start(self) -> datetime:
        return datetime.combine(self.day, time(0), tzinfo=UTC)

    @property
    def range_end(self) -> datetime:
        return self.range_start + timedelta(days=1)


def partition_name(day: date) -> str:
    """``heartbeats_pYYYYMMDD`` for a UTC day."""
    return f"heartbeats_p{day:%Y%m%d}"


def day_of(name: str) -> date | None:
    """The day a partition name stands for, or None if the name is not one of ours."""
    match = NAME_RE.fullmatch(name)
    if not match:
        return None
    try:
        return datetime.strptime(match.group(1), "%Y%m%d").date()
    except ValueError:  # eight digits that are not a date (20261399)
        return None


def plan_partitions(existing: set[str], today: date, premake_days: int) -> list[PartitionSpec]:
    """Partitions to create so that today and the next ``premake_days`` days exist. Pure."""
    wanted = [today + timedelta(days=i) for i in range(premake_days + 1)]
    return [PartitionSpec(partition_name(d), d) for d in wanted if partition_name(d) not in existing]


def list_partitions(conn: Connection, parent: str = "heartbeats") -> set[str]:
    """Names of the partitions attached to ``parent`` (heartbeats, or events)."""
    rows = conn.exec_driver_sql(
        """
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = %(parent)s
        """,
        {"parent": parent},
    ).fetchall()
    return {r[0] for r in rows}


def create_partition(conn: Connection, spec: PartitionSpec) -> None:
    """Create one daily partition and record it in hb_partitions (idempotent). Caller commits."""
    conn.exec_driver_sql(
        f"CREATE TABLE IF NOT EXISTS {spec.name} PARTITION OF heartbeats "
        f"FOR VALUES FROM ('{spec.range_start.isoformat()}') TO ('{spec.range_end.isoformat()}')"
    )
    conn.exec_driver_sql(
        """
        INSERT INTO hb_partitions (name, range_start, range_end, state)
        VALUES (%(name)s, %(start)s, %(end)s, 'active')
        ON CONFLICT (name) DO UPDATE SET state = 'active'
            WHERE hb_partitions.state = 'dropped'
        """,
        {"name": spec.name, "start": spec.range_start, "end": spec.range_end},
    )


PARTITION_DDL_LOCK = "nexmdm:partitions:ddl"


def lock_partition_ddl(conn: Connection) -> None:
    """Take the partition-DDL lock for the rest of the transaction: one partition maker or
    dropper at a time (heartbeats and events days, start-up, the writer on demand, the jobs,
    archive and restore). Waits for the holder."""
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext(%(key)s))", {"key": PARTITION_DDL_LOCK})


def ensure_partitions(conn: Connection, today: date, premake_days: int) -> list[str]:
    """Converge on "today and the next ``premake_days`` days have a partition".

    Idempotent; returns the names it created. Serialised by a transaction-scoped advisory
    lock so concurrent callers (workers starting together) do not race. Caller commits.
    """
    lock_partition_ddl(conn)
    plan = plan_partitions(list_partitions(conn), today, premake_days)
    for spec in plan:
        create_partition(conn, spec)
    return [spec.name for spec in plan]
