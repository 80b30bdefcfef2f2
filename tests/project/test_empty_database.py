"""empty_database (behind the ``engine`` fixture) leaves what TRUNCATE ... RESTART IDENTITY of every
table and a fresh week of partitions (heartbeats and events) left, whichever tables held rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from db.events import event_partition_name, list_event_partitions, maintain_event_partitions
from db.partitions import list_partitions, partition_name
from tests.conftest import TABLES, empty_database
from tests.support.jobdata import fill_day, make_devices, scalar


def test_rows_partitions_and_sequences_are_as_after_a_full_reset(engine):
    today = datetime.now(UTC).date()
    week = {partition_name(today + timedelta(days=i)) for i in range(8)}
    devices = make_devices(engine, 3)
    fill_day(engine, today - timedelta(days=30), devices)  # a partition outside the week, with rows
    fill_day(engine, today, devices)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO job_runs (job, started_at, status) VALUES ('reconcile', now(), 'skipped')")
        conn.exec_driver_sql("DELETE FROM hb_partitions WHERE name = %(n)s", {"n": partition_name(today)})
        maintain_event_partitions(conn, today - timedelta(days=4), 0, None)  # an events day outside the week
        # Rows in a table that an empty one references (webhook_deliveries -> webhooks).
        conn.exec_driver_sql("INSERT INTO webhooks (url, secret) VALUES ('http://127.0.0.1:9/', 's')")
    # A sequence moved on in a table that stays empty (a rolled-back insert).
    with engine.connect() as conn:
        conn.exec_driver_sql("INSERT INTO audit_log (actor, actor_role, action, outcome) "
                             "VALUES ('t', 'admin', 't', 'ok')")
        conn.rollback()

    empty_database(engine)

    for table in (t.strip() for t in TABLES.split(",")):
        expected = len(week) if table == "hb_partitions" else 0
        assert scalar(engine, f"SELECT count(*) FROM {table}") == expected, table
    with engine.begin() as conn:
        assert list_partitions(conn) == week
        assert list_event_partitions(conn) == {event_partition_name(today + timedelta(days=i)) for i in range(8)}
        recorded = set(conn.exec_driver_sql("SELECT name, state FROM hb_partitions").fetchall())
        assert recorded == {(name, "active") for name in week}
        # Every sequence starts again, in tables that held rows and in the one that did not.
        assert make_devices(engine, 1, prefix="again") == [1]
        assert conn.exec_driver_sql("INSERT INTO job_runs (job, started_at, status) "
                                    "VALUES ('reconcile', now(), 'skipped') RETURNING id").scalar_one() == 1
        assert conn.exec_driver_sql("INSERT INTO audit_log (actor, actor_role, action, outcome) "
                                    "VALUES ('t', 'admin', 't', 'ok') RETURNING id").scalar_one() == 1
