"""Every kind of bad input answers a JSON 4xx naming the problem, and writes nothing."""

from __future__ import annotations

import pytest

from tests.support.helpers import (
    bearer,
    enroll,
    heartbeat_body,
    settings_on_both_heartbeat_paths,  # noqa: F401 (the "settings" fixture: every test on both paths)
)


def rows(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return (
            conn.exec_driver_sql("SELECT count(*) FROM heartbeats").scalar_one(),
            conn.exec_driver_sql("SELECT count(*) FROM device_last_status").scalar_one(),
        )


@pytest.fixture
def token(client, admin) -> str:
    return enroll(client, admin)[0]["token"]


BAD_BODIES = [
    ("not json", 400, "malformed_json"),
    ('{"sent_at": ', 400, "malformed_json"),
    ('{"battery_pct": NaN}', 400, "malformed_json"),
    ("[1, 2]", 422, "validation_failed"),
    ("[" * 5000 + "]" * 5000, 400, "malformed_json"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_BODIES)
def test_malformed_bodies(client, token, engine, body, status, code):
    resp = client.post("/v1/heartbeat", data=body, content_type="application/json", headers=bearer(token))
    assert resp.status_code in (status, 413), resp.get_json()
    assert resp.is_json and "error" in resp.get_json()
    assert rows(engine) == (0, 0)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"battery_pct": 101}, "battery_pct"),
        ({"battery_pct": -1}, "battery_pct"),
        ({"battery_pct": "full"}, "battery_pct"),
        ({"charging": "yes"}, "charging"),
        ({"network_type": "carrier-pigeon"}, "network_type"),
        ({"signal_dbm": 20}, "signal_dbm"),
        ({"sent_at": "yesterday"}, "sent_at"),
        ({"sent_at": "2026-11-27T10:00:00"}, "sent_at"),  # no zone
        ({"uptime_s": -5}, "uptime_s"),
        ({"app_version": ""}, "app_version"),
        ({"app_version": "x" * 65}, "app_version"),
    ],
)
def test_invalid_fields_are_named(client, token, engine, override, field):
    resp = client.post("/v1/heartbeat", json=heartbeat_body(**override), headers=bearer(token))
    assert resp.status_code == 422
    assert resp.get_json()["error"] == "validation_failed"
    assert field in resp.get_json()["detail"]
    assert rows(engine) == (0, 0)


def test_missing_field_is_named(client, token, engine):
    body = heartbeat_body()
    del body["free_storage_mb"]
    resp = client.post("/v1/heartbeat", json=body, headers=bearer(token))
    assert resp.status_code == 422 and "free_storage_mb" in resp.get_json()["detail"]
    assert rows(engine) == (0, 0)


def test_body_over_limit_is_413(client, token, engine):
    resp = client.post("/v1/heartbeat", json=heartbeat_body(blob="x" * 20_000), headers=bearer(token))
    assert resp.status_code == 413 and resp.get_json()["error"] == "body_too_large"
    assert rows(engine) == (0, 0)


def test_extra_fields_over_limit_are_refused(client, token, engine):
    resp = client.post("/v1/heartbeat", json=heartbeat_body(blob="x" * 5_000), headers=bearer(token))
    assert resp.status_code == 422 and resp.get_json()["error"] == "extra_too_large"
    assert rows(engine) == (0, 0)


def test_wrong_content_type_is_415(client, token, engine):
    resp = client.post("/v1/heartbeat", data="battery_pct=5", content_type="text/plain", headers=bearer(token))
    assert resp.status_code == 415
    assert rows(engine) == (0, 0)


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "token_required"),
        ({"Authorization": "Basic abc"}, "token_required"),
        ({"Authorization": "Bearer nxm_not-a-real-token"}, "token_invalid"),
    ],
)
def test_device_auth_failures_are_401(client, engine, headers, code):
    resp = client.post("/v1/heartbeat", json=heartbeat_body(), headers=headers)
    assert resp.status_code == 401 and resp.get_json()["error"] == code
    assert rows(engine) == (0, 0)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/v1/devices"),
        ("get", "/v1/devices/1"),
        ("get", "/v1/fleet/summary"),
        ("get", "/v1/devices/1/heartbeats"),
        ("post", "/v1/devices/enroll"),
        ("post", "/v1/devices/1/token"),
        ("post", "/v1/devices/1/revoke"),
    ],
)
def test_admin_key_missing_401_wrong_403(client, method, path):
    missing = getattr(client, method)(path)
    assert missing.status_code == 401 and missing.get_json()["error"] == "admin_key_required"
    wrong = getattr(client, method)(path, headers={"x-admin": "nope"})
    assert wrong.status_code == 403 and wrong.get_json()["error"] == "admin_key_invalid"


def test_enroll_validation(client, admin, engine):
    bad = [
        {"devices": []},
        {"devices": [{"device_uid": "has space"}]},
        {"device_uid": "x", "unexpected": 1},
    ]
    for body in bad:
        resp = client.post("/v1/devices/enroll", json=body, headers=admin)
        assert resp.status_code == 422, body
    # Each entry valid, the batch in conflict with itself: 409 like an enrolled uid, nothing stored.
    resp = client.post("/v1/devices/enroll", json={"devices": [{"device_uid": "a"}, {"device_uid": "a"}]},
                       headers=admin)
    assert resp.status_code == 409 and resp.get_json() == {"error": "duplicate_in_batch",
                                                           "detail": {"device_uids": ["a"]}}
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM devices").scalar_one() == 0


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nope").get_json()["error"] == "not_found"
    assert client.get("/v1/heartbeat").status_code == 405


def test_a_whole_number_written_with_a_fraction_is_an_integer(client, admin, engine):
    """JSON Schema (and so /openapi.json) counts 80.0 as an integer: accepted as 80; 80.5 is not."""
    enrolled = enroll(client, admin, prefix="float-int")[0]
    auth = bearer(enrolled["token"])
    body = heartbeat_body(battery_pct=80.0, uptime_s=3600.0)
    assert client.post("/v1/heartbeat", json=body, headers=auth).status_code == 200
    status = client.get(f"/v1/devices/{enrolled['id']}", headers=admin).get_json()
    assert status["battery_pct"] == 80 and isinstance(status["battery_pct"], int)
    bad = client.post("/v1/heartbeat", json=heartbeat_body(battery_pct=80.5), headers=auth)
    assert bad.status_code == 422
