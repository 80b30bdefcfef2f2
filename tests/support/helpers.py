"""Small builders shared by tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from config.settings import Settings
from db.heartbeats import HeartbeatRow


def heartbeat_body(sent_at: datetime | str | None = None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sent_at": sent_at.isoformat() if isinstance(sent_at, datetime) else (sent_at or datetime.now(UTC).isoformat()),
        "battery_pct": 80,
        "charging": False,
        "network_type": "wifi",
        "signal_dbm": -60,
        "app_version": "1.0.0",
        "os_version": "14",
        "uptime_s": 3600,
        "free_storage_mb": 2048,
    }
    body.update(overrides)
    return body


def enroll(client, admin: dict[str, str], n: int = 1, prefix: str = "dev", labels=()) -> list[dict[str, Any]]:
    devices = [{"device_uid": f"{prefix}-{i}", "name": f"Device {i}", "labels": list(labels)} for i in range(n)]
    resp = client.post("/v1/devices/enroll", json={"devices": devices}, headers=admin)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["devices"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# One clock per process for writer_row: rows made moments apart on either side of a 10 s boundary
# would otherwise share a bucket (and the second be stored as a duplicate).
PROCESS_NOW = datetime.now(UTC).replace(microsecond=0)


def writer_row(device_id: int, n: int) -> HeartbeatRow:
    """A heartbeat row for the writer probes, ``n`` 10 s buckets before this process's clock."""
    bucket = datetime.fromtimestamp(int(PROCESS_NOW.timestamp()) // 10 * 10, UTC) - timedelta(seconds=10 * n)
    return HeartbeatRow(device_id=device_id, bucket_ts=bucket, sent_at=bucket, received_at=PROCESS_NOW,
                        clock_skew_s=0.0, battery_pct=50, charging=False, network_type="wifi", signal_dbm=None,
                        app_version="1", os_version="1", uptime_s=1, free_storage_mb=1, extra_json=None)


@pytest.fixture(name="settings", params=[True, False], ids=["lean-path", "flask-path"])
def settings_on_both_heartbeat_paths(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """Import into a test module to run each of its tests against both heartbeat paths: the
    lean WSGI path (api/heartbeat_wsgi.py) and the Flask route."""
    return settings.with_overrides(heartbeat_lean_path=request.param)
