"""Pure parts of ingestion and partition planning."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from api.errors import ApiError
from api.heartbeat_parsing import choose_bucket, floor_to_bucket, parse_heartbeat
from config.settings import Settings
from db.partitions import day_of, partition_name, plan_partitions


def test_floor_to_bucket():
    ts = datetime(2026, 11, 27, 12, 0, 19, 999_000, tzinfo=UTC)
    assert floor_to_bucket(ts, 10) == datetime(2026, 11, 27, 12, 0, 10, tzinfo=UTC)
    assert floor_to_bucket(ts, 60) == datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


def test_bucket_uses_device_clock_within_skew_else_server_clock():
    now = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
    bucket, skew, corrected = choose_bucket(now - timedelta(seconds=42), now, 10, 300)
    assert bucket == datetime(2026, 11, 27, 11, 59, 10, tzinfo=UTC) and skew == 42 and not corrected
    bucket, skew, corrected = choose_bucket(now - timedelta(hours=2, seconds=-13), now, 10, 300)
    assert bucket == now + timedelta(seconds=10) and skew == 7187 and corrected


def test_retries_from_a_skewed_clock_share_a_bucket():
    """The same body resent seconds later (server clock moved on) maps to the same bucket."""
    sent_at = datetime(2020, 3, 1, 8, 0, 7, tzinfo=UTC)  # a clock years behind
    now = datetime(2026, 11, 27, 12, 0, 9, 500_000, tzinfo=UTC)
    buckets = {choose_bucket(sent_at, now + timedelta(seconds=d), 10, 300)[0] for d in (0, 1, 2, 3, 5, 8)}
    assert len(buckets) == 1
    [bucket] = buckets
    assert abs((bucket - now).total_seconds()) <= 1800


def test_parse_heartbeat_collects_unknown_fields():
    body = (
        b'{"sent_at":"2026-11-27T12:00:05+01:00","battery_pct":5,"charging":true,"network_type":"cellular",'
        b'"app_version":"3.1","os_version":"14","uptime_s":1,"free_storage_mb":2,"rooted":false}'
    )
    now = datetime(2026, 11, 27, 11, 0, 9, tzinfo=UTC)
    row, corrected = parse_heartbeat(body, 7, Settings(), now)
    assert row.device_id == 7 and bytes(row.extra_json) == b'{"rooted":false}' and not corrected
    assert row.bucket_ts == datetime(2026, 11, 27, 11, 0, 0, tzinfo=UTC)
    assert row.signal_dbm is None


def test_parse_heartbeat_rejects_bool_as_int():
    body = (
        b'{"sent_at":"2026-11-27T12:00:05Z","battery_pct":true,"charging":true,"network_type":"wifi",'
        b'"app_version":"3.1","os_version":"14","uptime_s":1,"free_storage_mb":2}'
    )
    with pytest.raises(ApiError) as info:
        parse_heartbeat(body, 1, Settings(), datetime.now(UTC))
    assert info.value.status == 422 and "battery_pct" in info.value.detail


def test_plan_partitions_converges():
    today = date(2026, 11, 27)
    plan = plan_partitions(set(), today, 7)
    assert [p.name for p in plan][0] == "heartbeats_p20261127" and len(plan) == 8
    assert plan_partitions({p.name for p in plan}, today, 7) == []
    assert [p.name for p in plan_partitions({p.name for p in plan}, today + timedelta(days=1), 7)] == [
        "heartbeats_p20261205"
    ]
    assert day_of(partition_name(today)) == today and day_of("heartbeats_default") is None


def test_settings_from_env_parses_types_and_rejects_garbage():
    s = Settings.from_env({"PORT": "9000", "READ_FROM_LAST_STATUS": "false", "DB_POOL_SIZE": "7"})
    assert s.port == 9000 and s.read_from_last_status is False and s.db_pool_size == 7
    with pytest.raises(ValueError, match="PORT"):
        Settings.from_env({"PORT": "eighty"})
