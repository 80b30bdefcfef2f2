"""Metric helpers, pool-health judgement and the pool monitor's exit codes (no database)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from api import metrics
from api.contract import pool_status
from api.pool_health import assess, figures_from_gauges
from api.pool_monitor import exit_code_for, format_report
from api.schemas import PoolFigures, PostgresFigures
from tests.support.metrics_scrape import bucket_around, histogram_quantile


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_observe_job_counts_runs_by_outcome_duration_and_last_success():
    jobs = metrics.JobMetrics()
    before_ok = sample("nexmdm_job_runs_total", job_name="unit-job", outcome="succeeded")
    before_failed = sample("nexmdm_job_runs_total", job_name="unit-job", outcome="failed")
    before_count = sample("nexmdm_job_duration_seconds_count", job_name="unit-job")
    before_slow = sample("nexmdm_job_duration_seconds_bucket", job_name="unit-job", le="5.0")

    jobs.observe("unit-job", "failed", 42.0)
    assert sample("nexmdm_job_last_success_timestamp_seconds", job_name="unit-job") == 0
    jobs.observe("unit-job", "succeeded", 2.5, finished_at_s=1_790_000_000.0)

    assert sample("nexmdm_job_runs_total", job_name="unit-job", outcome="succeeded") == before_ok + 1
    assert sample("nexmdm_job_runs_total", job_name="unit-job", outcome="failed") == before_failed + 1
    assert sample("nexmdm_job_duration_seconds_count", job_name="unit-job") == before_count + 2
    assert sample("nexmdm_job_duration_seconds_bucket", job_name="unit-job", le="5.0") == before_slow + 1  # 2.5 s only
    assert sample("nexmdm_job_last_success_timestamp_seconds", job_name="unit-job") == 1_790_000_000.0

    jobs.set_last_success("unit-job", 1_780_000_000.0)  # an older reading never moves it back
    assert sample("nexmdm_job_last_success_timestamp_seconds", job_name="unit-job") == 1_790_000_000.0
    jobs.observe("unit-job", "succeeded", 0.1)  # now by default
    assert sample("nexmdm_job_last_success_timestamp_seconds", job_name="unit-job") == pytest.approx(time.time(), abs=5)


def test_observe_job_report_reads_a_scheduler_report():
    from dataclasses import dataclass, field

    @dataclass
    class Report:  # the fields of scheduler.locking.JobReport that metrics read
        job: str
        status: str
        duration_s: float
        finished_at: datetime
        detail: dict = field(default_factory=dict)

    jobs = metrics.JobMetrics()
    skipped = sample("nexmdm_job_runs_total", job_name="report-job", outcome="skipped")
    jobs.observe_report(Report("report-job", "skipped", 0.01, datetime.now(UTC)))
    jobs.observe_report(Report("report-job", "succeeded", 3.0, datetime.fromtimestamp(1_785_000_000, UTC)))
    assert sample("nexmdm_job_runs_total", job_name="report-job", outcome="skipped") == skipped + 1
    assert sample("nexmdm_job_last_success_timestamp_seconds", job_name="report-job") == 1_785_000_000


def test_observe_job_refuses_an_unknown_outcome():
    with pytest.raises(ValueError, match="outcome"):
        metrics.JobMetrics().observe("unit-job", "exploded", 1.0)


def test_job_metrics_of_two_apps_keep_their_own_memory():
    """What one app remembers (last successes, when it read job_runs) is not another's: the old
    module-level dict let one app's newer success stop another app from publishing its own."""
    first, second = metrics.JobMetrics(), metrics.JobMetrics()
    first.set_last_success("unit-two-apps", 1_790_000_000.0)
    second.set_last_success("unit-two-apps", 1_780_000_000.0)  # second's own first reading: published
    assert sample("nexmdm_job_last_success_timestamp_seconds", job_name="unit-two-apps") == 1_780_000_000.0
    assert first.reread_due(1000.0) and not first.reread_due(1000.0 + first.reread_s - 1)
    assert second.reread_due(1000.0 + 1)  # first's reading is not second's
    assert first.reread_due(1000.0 + first.reread_s)


def test_replica_gauges_of_two_apps_do_not_collide_and_appear_only_when_measured():
    from types import SimpleNamespace

    first, second = metrics.ReplicaGauges(), metrics.ReplicaGauges()
    assert first.registry.get_sample_value("nexmdm_replica_up") is None  # nothing before a measurement
    first.observe(SimpleNamespace(reachable=True, lag_s=0.25))
    second.observe(SimpleNamespace(reachable=False, lag_s=None))  # the old module-level pair was shared
    assert first.registry.get_sample_value("nexmdm_replica_up") == 1
    assert first.registry.get_sample_value("nexmdm_replica_lag_seconds") == 0.25
    assert second.registry.get_sample_value("nexmdm_replica_up") == 0
    body, _ = metrics.render_metrics(None, [first.registry])
    assert b"nexmdm_replica_lag_seconds 0.25" in body and b"nexmdm_job_runs_total" in body


def test_a_pool_class_keeps_its_plane_and_two_planes_coexist():
    device, operator = metrics.metered_pool("device"), metrics.metered_pool("operator")
    assert (device.plane, operator.plane, metrics.MeteredQueuePool.plane) == ("device", "operator", "all")
    assert issubclass(device, metrics.MeteredQueuePool)


def test_known_jobs_have_zero_series_before_their_first_run():
    metrics.initialize_series()
    for job in metrics.KNOWN_JOBS:
        for outcome in metrics.JOB_OUTCOMES:
            assert REGISTRY.get_sample_value("nexmdm_job_runs_total", {"job_name": job, "outcome": outcome}) is not None


def test_heartbeat_and_flush_helpers_count_what_they_are_told():
    accepted, duplicate = sample("nexmdm_heartbeats_accepted_total"), sample("nexmdm_heartbeats_duplicate_total")
    rejected = sample("nexmdm_heartbeats_rejected_total", reason="unit_reason")
    slow = sample("nexmdm_heartbeat_write_duration_seconds_bucket", le="0.15")
    metrics.observe_heartbeat(True, 0.12)
    metrics.observe_heartbeat(False, 0.2)
    metrics.reject_heartbeat("unit_reason")
    assert sample("nexmdm_heartbeats_accepted_total") == accepted + 1
    assert sample("nexmdm_heartbeats_duplicate_total") == duplicate + 1
    assert sample("nexmdm_heartbeats_rejected_total", reason="unit_reason") == rejected + 1
    assert sample("nexmdm_heartbeat_write_duration_seconds_bucket", le="0.15") == slow + 1

    rows = sample("nexmdm_ingest_flush_rows_sum")
    metrics.observe_flush(37, 0.004)
    assert sample("nexmdm_ingest_flush_rows_sum") == rows + 37


def test_slo_boundaries_are_bucket_edges():
    for edge in (0.02, 0.15, 0.3):
        assert edge in metrics.LATENCY_BUCKETS_S


def test_prepare_multiproc_dir_empties_only_value_files(tmp_path):
    target = tmp_path / "prom"
    target.mkdir()
    (target / "counter_123.db").write_bytes(b"x")
    (target / "gauge_livesum_123.db").write_bytes(b"x")
    (target / "README").write_text("keep me")
    assert metrics.prepare_multiproc_dir(target) == target
    assert sorted(p.name for p in target.iterdir()) == ["README"]
    assert metrics.prepare_multiproc_dir(tmp_path / "new" / "dir").is_dir()


@pytest.mark.parametrize(("pct", "status"), [(0, "OK"), (80, "OK"), (80.1, "WARN"), (95, "WARN"), (95.1, "CRITICAL")])
def test_pool_status_thresholds(pct, status):
    assert pool_status(pct) == status


def _pool(busiest: float, overall: float = 10.0, capacity: int = 200) -> PoolFigures:
    return PoolFigures(2, capacity // 2, capacity // 2, capacity, 1, 0, overall, busiest)


def _pg(in_use: int = 10) -> PostgresFigures:
    return PostgresFigures(600, 3, in_use, 5, 597 - in_use, round(100 * in_use / 597, 1))


def test_assess_takes_the_worst_signal():
    now = datetime.now(UTC)
    assert assess(_pool(50), _pg(), None, now).status == "OK"
    # One worker out of connections is CRITICAL even when the server-wide figure is low.
    critical = assess(_pool(100, overall=50), _pg(), None, now)
    assert critical.status == "CRITICAL" and "busiest worker" in critical.reasons[0]
    assert assess(_pool(10), _pg(in_use=500), None, now).status == "WARN"
    assert assess(_pool(10), None, "connection refused", now).status == "CRITICAL"
    oversized = assess(_pool(10, capacity=1000), _pg(), None, now)
    assert oversized.status == "WARN" and "more than the 597" in oversized.reasons[0]


def test_figures_from_gauges_sum_and_ratio():
    fig = figures_from_gauges({
        "nexmdm_worker_processes": 4, "nexmdm_db_pool_size_connections": 8,
        "nexmdm_db_pool_max_overflow_connections": 8, "nexmdm_db_pool_checked_out_connections": 12,
        "nexmdm_db_pool_overflow_connections": 3, "nexmdm_db_pool_utilization_ratio": 1.0,
    })
    assert (fig.workers, fig.capacity, fig.in_use, fig.overflow) == (4, 16, 12, 3)
    assert fig.utilization_pct == 75.0 and fig.busiest_worker_utilization_pct == 100.0


def test_pool_monitor_exit_codes_and_report():
    assert [exit_code_for(s) for s in ("OK", "WARN", "CRITICAL", "???")] == [0, 1, 2, 3]
    import msgspec

    health = msgspec.to_builtins(assess(_pool(100), _pg(), None, datetime.now(UTC)))
    text = format_report("http://x", health)
    assert text.splitlines()[0] == "NexMDM pool health at http://x: CRITICAL"
    assert "busiest worker 100" in text and "headroom 587" in text


def test_histogram_quantile_helper_matches_prometheus_interpolation():
    buckets = [(0.1, 10.0), (0.2, 30.0), (0.5, 40.0), (float("inf"), 40.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)  # rank 20: halfway through (0.1, 0.2]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert bucket_around(0.15, [0.1, 0.2, 0.5]) == (0.1, 0.2)


def test_a_starting_workers_empty_file_does_not_break_a_scrape(tmp_path):
    # A worker creates its value file empty and sizes it a moment later; a scrape in between
    # must still answer (prometheus_client's own collector raises struct.error there).
    (tmp_path / "counter_4242.db").touch()
    (tmp_path / "gauge_livesum_4242.db").touch()
    body, _ = metrics.render_metrics(tmp_path)
    assert body == b""
    assert metrics.live_gauge_values(tmp_path) == {}
