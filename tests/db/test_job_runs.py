"""db/job_runs.py: the checks every job firing makes read a few index entries, not the table
(the events job fires every 30 s: 2,880 succeeded runs a day, kept 30 days)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from db.job_runs import (
    CLOSE_ABANDONED_SQL,
    SUCCEEDED_IN_PERIOD_SQL,
    close_abandoned,
    insert_run,
    prune_runs,
    succeeded_in_period,
)

DAY_OF_EVENTS = 2_880


def _fill_a_day_of_event_runs(engine) -> str:
    """A day of events runs every 30 s (as the scheduler records them) and a few of other jobs;
    returns the last period."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            """
            INSERT INTO job_runs (job, started_at, finished_at, status, detail, trigger)
            SELECT 'events', t, t + interval '1 s', 'succeeded',
                   jsonb_build_object('lock', 'events', 'period', to_char(t, 'YYYY-MM-DD"T"HH24:MI:SS')), 'schedule'
            FROM generate_series(now() - interval '1 day', now(), interval '30 s') AS t
            """
        )
        conn.exec_driver_sql(
            "INSERT INTO job_runs (job, started_at, finished_at, status, detail, trigger) "
            "SELECT 'reconcile', now() - n * interval '1 h', now(), 'succeeded', '{\"lock\": \"reconcile\"}', "
            "'schedule' FROM generate_series(1, 24) AS n"
        )
        conn.exec_driver_sql("ANALYZE job_runs")
        return conn.exec_driver_sql(
            "SELECT detail->>'period' FROM job_runs WHERE job = 'events' ORDER BY id DESC LIMIT 1").scalar_one()


def _plan_nodes(plan: dict) -> list[dict]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += _plan_nodes(child)
    return nodes


def _explain(engine, sql: str, params: dict, analyze: bool) -> list[dict]:
    with engine.connect() as conn:
        options = "ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON"
        raw = conn.exec_driver_sql(f"EXPLAIN ({options}) {sql}", params).scalar_one()
        conn.rollback()
    plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
    return _plan_nodes(plan)


def test_the_period_check_reads_its_index_not_every_run_of_the_job(engine):
    """Before 0006 the check was served by (job, started_at) at best: every succeeded events run
    of the kept days read and filtered on detail->>'period'."""
    last = _fill_a_day_of_event_runs(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM job_runs WHERE job = 'events'").scalar_one() >= DAY_OF_EVENTS
        assert succeeded_in_period(conn, "events", last)
        assert not succeeded_in_period(conn, "events", "1999-01-01T00:00:00")
        conn.rollback()
    nodes = _explain(engine, SUCCEEDED_IN_PERIOD_SQL, {"job": "events", "period": last}, analyze=True)
    scans = [n for n in nodes if "Scan" in n["Node Type"]]
    assert [n.get("Index Name") for n in scans] == ["ix_job_runs_succeeded_period"], scans
    assert sum(n.get("Rows Removed by Filter", 0) for n in nodes) == 0, nodes
    assert sum(n["Actual Rows"] for n in scans) == 1


def test_the_abandoned_run_check_reads_only_running_records(engine):
    _fill_a_day_of_event_runs(engine)
    nodes = _explain(engine, CLOSE_ABANDONED_SQL, {"lock": "events", "error": "x"}, analyze=False)
    scans = [n for n in nodes if "Scan" in n["Node Type"]]
    assert [n.get("Index Name") for n in scans] == ["ix_job_runs_running"], scans


def test_only_a_success_counts_for_the_period_and_only_running_records_of_the_lock_are_closed(engine):
    started = datetime.now(UTC)
    with engine.begin() as conn:
        for status in ("failed", "skipped", "running"):
            insert_run(conn, "events", status, "schedule", {"lock": "events", "period": "P1"}, started,
                       finished=status != "running")
        insert_run(conn, "restore", "running", "cli", {"lock": "nightly"}, started, finished=False)
        assert not succeeded_in_period(conn, "events", "P1")
        insert_run(conn, "events", "succeeded", "schedule", {"lock": "events", "period": "P1"}, started,
                   finished=True)
        assert succeeded_in_period(conn, "events", "P1") and not succeeded_in_period(conn, "nightly", "P1")
        assert close_abandoned(conn, "events") == 1
        assert close_abandoned(conn, "nightly") == 1  # the restore's record: it runs under nightly's lock
        assert close_abandoned(conn, "events") == 0
        old = insert_run(conn, "events", "succeeded", "schedule", {}, started - timedelta(days=40), finished=True)
        assert prune_runs(conn, started - timedelta(days=30)) == 1
        assert conn.exec_driver_sql("SELECT count(*) FROM job_runs WHERE id = %(id)s", {"id": old}).scalar_one() == 0
