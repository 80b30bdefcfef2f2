"""Small builders shared by tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


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
