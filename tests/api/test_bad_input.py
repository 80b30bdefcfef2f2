"""Bad and hostile input through the Flask test client on the real database, on both heartbeat
paths: every kind of bad input answers a JSON 4xx naming the problem and writes nothing; never a
5xx (the test app re-raises any unexpected exception), never a stack trace (property tests with
hypothesis). Over HTTP against a live server: tests/api/test_http_hostile.py."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


HYPOTHESIS = settings(
    max_examples=120, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=50)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = ["sent_at", "battery_pct", "charging", "network_type", "signal_dbm", "app_version", "os_version",
          "uptime_s", "free_storage_mb"]
plausible = {
    "sent_at": st.one_of(
        st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
        st.datetimes().map(lambda d: d.isoformat()),  # no zone
        st.just((datetime.now(UTC) - timedelta(seconds=30)).isoformat()),
        st.text(max_size=40),
    ),
    "battery_pct": st.integers(-5, 105) | st.floats(),
    "charging": st.booleans() | st.integers(0, 1),
    "network_type": st.sampled_from(["wifi", "cellular", "ethernet", "none", "5g", ""]),
    "signal_dbm": st.integers(-200, 10) | st.none(),
    "app_version": st.text(max_size=80),
    "os_version": st.text(max_size=80),
    "uptime_s": st.integers(-1, 2**64),
    "free_storage_mb": st.integers(-1, 2**40),
}
heartbeat_like = st.fixed_dictionaries(
    {}, optional={name: plausible[name] | json_values for name in FIELDS}
).flatmap(lambda d: st.dictionaries(st.text(max_size=12), json_values, max_size=3).map(lambda extra: {**extra, **d}))


def counts(engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        return tuple(conn.exec_driver_sql(
            "SELECT (SELECT count(*) FROM heartbeats), (SELECT count(*) FROM device_last_status), "
            "(SELECT count(*) FROM devices)"
        ).one())


def assert_clean_error(resp) -> None:
    assert resp.status_code < 500, resp.get_data(as_text=True)[:500]
    text = resp.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text
    if resp.status_code >= 400:
        body = resp.get_json()
        assert set(body) == {"error", "detail"} and isinstance(body["error"], str)


def encode(value) -> bytes:
    # allow_nan: NaN and Infinity literals are exactly what a hostile client would send.
    return json.dumps(value, allow_nan=True).encode()


def post_heartbeat(client, engine, device, data: bytes):
    """POST a raw heartbeat body; the answer (already checked to be a clean one) and the row
    counts before and after it."""
    before = counts(engine)
    resp = client.post("/v1/heartbeat", data=data, content_type="application/json",
                       headers=bearer(device["token"]))
    assert_clean_error(resp)
    return resp, before, counts(engine)


@pytest.fixture
def device(client, admin):
    return enroll(client, admin, 1, prefix="hostile")[0]


@HYPOTHESIS
@given(body=heartbeat_like)
def test_heartbeat_bodies(client, engine, device, body):
    resp, before, after = post_heartbeat(client, engine, device, encode(body))
    if resp.status_code == 200:
        stored = resp.get_json()["status"] == "stored"
        assert after[0] == before[0] + stored
    else:
        assert resp.status_code in (400, 413, 422), resp.get_json()
        assert after == before


hostile_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=70) | st.sampled_from(
    ["\u0000", "a\u0000", "\r\nX-Injected: 1", "'; DROP TABLE heartbeats; --", "\u202e", "%s%s%n", "${jndi:x}"]
)


@HYPOTHESIS
@given(field=st.sampled_from([*FIELDS, "extra_field", "sent_at"]), value=json_values | hostile_text,
       second=st.integers(0, 20))
def test_valid_heartbeat_with_one_hostile_field(client, engine, device, field, value, second):
    """A valid body with one field replaced: reaches the deepest paths (bucket, INSERT)."""
    body = heartbeat_body(sent_at=datetime.now(UTC) - timedelta(seconds=10 * second))
    body[field] = value
    resp, before, after = post_heartbeat(client, engine, device, encode(body))
    if resp.status_code == 200:
        assert after[0] == before[0] + (resp.get_json()["status"] == "stored")
    else:
        assert after == before


@HYPOTHESIS
@given(body=st.binary(max_size=300) | json_values.map(encode))
def test_heartbeat_raw_bodies(client, engine, device, body):
    resp, before, after = post_heartbeat(client, engine, device, body)
    assert resp.status_code in (400, 422)
    assert after == before


# Bytes that break a valid JSON text inside one of its strings: invalid UTF-8 (a lone
# continuation byte, a truncated sequence, an encoded surrogate, a code point past U+10FFFF)
# and NUL, raw or escaped. Each lands right after the n-th quote of the body.
breaking_bytes = st.sampled_from([b"\xff", b"\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                  b"\xc0\xaf", b"\x00", b"\\u0000", b"a\x00b"])


def break_string(body: bytes, nth: int, junk: bytes) -> bytes:
    """``body`` with ``junk`` inserted after its ``nth`` quote (modulo how many it has)."""
    quotes = [i for i, b in enumerate(body) if b == ord('"')]
    at = quotes[nth % len(quotes)] + 1 if quotes else 0
    return body[:at] + junk + body[at:]


@HYPOTHESIS
@given(body=heartbeat_like.map(encode), nth=st.integers(0, 200), junk=breaking_bytes)
def test_heartbeats_with_non_utf8_or_nul_in_a_string(client, engine, device, body, nth, junk):
    resp, before, after = post_heartbeat(client, engine, device, break_string(body, nth, junk))
    assert resp.status_code in (400, 422), resp.get_json()
    assert after == before


device_like = st.fixed_dictionaries({}, optional={
    "device_uid": st.text(max_size=140) | st.from_regex(r"\A[A-Za-z0-9_.:-]{1,128}\Z") | json_values,
    "name": st.text(max_size=210) | st.none() | json_values,
    "labels": st.lists(st.text(max_size=70) | st.from_regex(r"\A[a-z=]{1,8}\Z"), max_size=34) | json_values,
}).flatmap(lambda d: st.dictionaries(st.text(max_size=8), json_values, max_size=1).map(lambda e: {**e, **d}))


@HYPOTHESIS
@given(body=device_like | st.fixed_dictionaries({"devices": st.lists(device_like, max_size=4) | json_values})
       | json_values)
def test_enrollment_bodies(client, engine, admin, body):
    before = counts(engine)
    resp = client.post("/v1/devices/enroll", data=encode(body), content_type="application/json", headers=admin)
    assert_clean_error(resp)
    after = counts(engine)
    if resp.status_code == 201:
        assert after[2] == before[2] + len(resp.get_json()["devices"])
    else:
        assert resp.status_code in (400, 409, 413, 422), resp.get_json()
        assert after == before


@HYPOTHESIS
@given(body=(device_like | st.fixed_dictionaries({"devices": st.lists(device_like, min_size=1, max_size=3)}))
       .map(encode), nth=st.integers(0, 200), junk=breaking_bytes)
def test_enrollments_with_non_utf8_or_nul_in_a_string(client, engine, admin, body, nth, junk):
    before = counts(engine)
    resp = client.post("/v1/devices/enroll", data=break_string(body, nth, junk), content_type="application/json",
                       headers=admin)
    assert_clean_error(resp)
    assert resp.status_code in (400, 422), resp.get_json()
    assert counts(engine) == before


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"x" * 16_385, "application/json", 413),  # over MAX_BODY_BYTES
        (nested(8_000), "application/json", 400),  # deep, within the size limit
        (b'{"a":' * 2500 + b"1" + b"}" * 2500, "application/json", 400),
        (json.dumps(heartbeat_body(app_version="v" * 10_000)).encode(), "application/json", 422),
        (json.dumps(heartbeat_body(note="x" * 15_000)).encode(), "application/json", 422),  # extra too large
        (json.dumps(heartbeat_body(nested=json.loads(nested(500)))).encode(), "application/json", 422),
        (json.dumps(heartbeat_body(nested=json.loads(nested(8)))).encode(), "application/json", 422),
        (json.dumps(heartbeat_body(app_version="a\u0000b")).encode(), "application/json", 422),  # NUL
        (json.dumps(heartbeat_body(note="a\u0000b")).encode(), "application/json", 422),
        (json.dumps(heartbeat_body(**{"k\u0000": 1})).encode(), "application/json", 422),
        (b'{"sent_at": NaN}', "application/json", 400),
        (json.dumps(heartbeat_body(battery_pct=math.inf)).encode(), "application/json", 400),
        (json.dumps(heartbeat_body(extra=math.nan)).encode(), "application/json", 400),
        (json.dumps(heartbeat_body(battery_pct=1e999)).encode(), "application/json", 400),
        (json.dumps(heartbeat_body(uptime_s=10**30)).encode(), "application/json", 422),
        (json.dumps(heartbeat_body(app_version="\ud800")).encode(), "application/json", 400),  # lone surrogate
        ("\ufeff".encode() + json.dumps(heartbeat_body()).encode(), "application/json", 400),
        (json.dumps(heartbeat_body()).encode("utf-16"), "application/json", 400),
        (json.dumps(heartbeat_body()).encode(), "text/plain", 415),
        (json.dumps(heartbeat_body()).encode(), "application/x-www-form-urlencoded", 415),
        (json.dumps(heartbeat_body()).encode(), "multipart/form-data; boundary=x", 415),
        (json.dumps(heartbeat_body()).encode(), "", 415),
        (b"", "application/json", 400),
        (json.dumps({**heartbeat_body(), "sent_at": "2026-01-01T00:00:00-16:00"}).encode(), "application/json", 200),
        (json.dumps({**heartbeat_body(), "sent_at": "0001-01-01T00:00:00+05:00"}).encode(), "application/json", 422),
        (json.dumps({**heartbeat_body(), "sent_at": "9999-12-31T23:59:59-05:00"}).encode(), "application/json", 422),
    ],
    ids=lambda v: None if isinstance(v, (bytes, int)) else v,
)
def test_hostile_heartbeats(client, engine, device, body, content_type, status):
    before = counts(engine)
    resp = client.post("/v1/heartbeat", data=body, headers={**bearer(device["token"]), "Content-Type": content_type})
    assert_clean_error(resp)
    assert resp.status_code == status, resp.get_json()
    if status != 200:
        assert counts(engine) == before


def test_hostile_enrollments(client, engine, admin):
    before = counts(engine)
    huge = json.dumps({"devices": [{"device_uid": f"d{i}", "name": "n" * 190} for i in range(25_000)]}).encode()
    for body, status in [
        (huge, 413),  # over 4 MB
        (nested(200_000), 400),
        (json.dumps({"device_uid": "u" * 1_000_000}).encode(), 422),
        (json.dumps({"devices": [{"device_uid": "a"}, {"device_uid": "a"}]}).encode(), 409),
        (json.dumps({"device_uid": "ok", "labels": ["x"] * 1000}).encode(), 422),
        (json.dumps({"device_uid": "ok", "is_admin": True}).encode(), 422),
        (json.dumps({"device_uid": "a'; DROP TABLE devices; --"}).encode(), 422),
        (b'{"device_uid": Infinity}', 400),
        (json.dumps({"device_uid": "ok", "name": "a\u0000"}).encode(), 422),
    ]:
        resp = client.post("/v1/devices/enroll", data=body, content_type="application/json", headers=admin)
        assert_clean_error(resp)
        assert resp.status_code == status, (body[:60], resp.get_json())
    assert counts(engine) == before


def test_hostile_query_parameters_and_headers(client, admin, device):
    for url in [
        "/v1/devices?limit=-1", "/v1/devices?limit=1e9", "/v1/devices?after=99999999999999999999999",
        "/v1/devices?status=%0d%0aSet-Cookie:%20x=1", "/v1/devices?battery_below=NaN",
        f"/v1/devices/{device['id']}/heartbeats?since=%00", f"/v1/devices/{device['id']}/heartbeats?since=9999-99-99",
        f"/v1/devices/{device['id']}/heartbeats?since=2026-01-01T00:00:00&until=2025-01-01T00:00:00Z",
        "/v1/devices/99999999999999999999999", "/v1/devices/-1", "/v1/devices/1%0d%0aX-Injected:1",
    ]:
        resp = client.get(url, headers=admin)
        assert_clean_error(resp)
        assert resp.status_code in (400, 404), (url, resp.status_code)
        assert "Set-Cookie" not in resp.headers and "X-Injected" not in resp.headers
    for auth in ["Bearer", "Bearer ", "Bearer " + "a" * 10_000, "bearer\t" + device["token"] + "x",
                 "Basic " + device["token"], "Bearer " + device["token"] + "\u00e9", "Bearer \x00"]:
        resp = client.post("/v1/heartbeat", json=heartbeat_body(), headers={"Authorization": auth})
        assert_clean_error(resp)
        assert resp.status_code == 401, (auth[:30], resp.status_code)
