"""The lean WSGI path answers POST /v1/heartbeat exactly as the Flask route does: the same
status, headers and body for every outcome, the same rows and metrics; and it really skips
Flask (no request hook runs for a heartbeat on it)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from api.app import create_app
from db.errors import Overloaded
from tests.support.helpers import bearer, enroll, heartbeat_body


@pytest.fixture
def apps(settings, engine):
    """(lean, flask): two apps on the same database, one per heartbeat path."""
    made = []
    for lean in (True, False):
        app = create_app(settings.with_overrides(heartbeat_lean_path=lean), engine=engine)
        app.testing = True
        made.append(app)
    yield made
    for app in made:
        app.extensions["nexmdm"].close()  # the writer's greenlets and its connection


def overloaded_count() -> float:
    return REGISTRY.get_sample_value("nexmdm_heartbeats_rejected_total", {"reason": "overloaded"}) or 0.0


def answer(app, **kwargs):
    resp = app.test_client().post("/v1/heartbeat", **kwargs)
    return resp.status_code, sorted((k, v) for k, v in resp.headers.items()), resp.get_data()


def test_every_error_answer_is_the_same_on_both_paths(apps, admin):
    lean, flask = apps
    token = enroll(lean.test_client(), admin, 1)[0]["token"]
    good = json.dumps(heartbeat_body()).encode()
    cases = {
        "no token": {"data": good, "content_type": "application/json"},
        "bad scheme": {"data": good, "content_type": "application/json", "headers": {"Authorization": "Basic x"}},
        "unknown token": {"data": good, "content_type": "application/json", "headers": bearer("nope")},
        "not json type": {"data": good, "content_type": "text/plain", "headers": bearer(token)},
        "empty": {"data": b"", "content_type": "application/json", "headers": bearer(token)},
        "malformed": {"data": b"{", "content_type": "application/json", "headers": bearer(token)},
        "not an object": {"data": b"[1]", "content_type": "application/json", "headers": bearer(token)},
        "invalid field": {"data": json.dumps(heartbeat_body(battery_pct=101)).encode(),
                          "content_type": "application/json", "headers": bearer(token)},
        "missing field": {"data": b'{"sent_at": "2026-01-01T00:00:00Z"}', "content_type": "application/json",
                          "headers": bearer(token)},
        "NUL": {"data": json.dumps(heartbeat_body(app_version="a\u0000")).encode(),
                "content_type": "application/json", "headers": bearer(token)},
        "too large": {"data": b" " * 20_000 + good, "content_type": "application/json", "headers": bearer(token)},
        "extra too deep": {"data": json.dumps(heartbeat_body(x=[[[[[[[[[1]]]]]]]]])).encode(),
                           "content_type": "application/json", "headers": bearer(token)},
    }
    for name, kwargs in cases.items():
        on_lean, on_flask = answer(lean, **kwargs), answer(flask, **kwargs)
        assert on_lean == on_flask, name
        assert 400 <= on_lean[0] < 500 and json.loads(on_lean[2])["error"], name


def headers_but_length(answered: tuple[int, list[tuple[str, str]], bytes]) -> list[tuple[str, str]]:
    """An answer's headers with Content-Length checked against its body and left out."""
    status, headers, body = answered
    assert ("Content-Length", str(len(body))) in headers, (status, headers)
    return [(k, v) for k, v in headers if k != "Content-Length"]


def test_acknowledgements_and_refusals_are_the_same_on_both_paths(apps, admin, engine):
    lean, flask = apps
    device = enroll(lean.test_client(), admin, 1)[0]
    sent_at = datetime.now(UTC) - timedelta(seconds=30)
    body = {"data": json.dumps(heartbeat_body(sent_at)).encode(), "content_type": "application/json",
            "headers": bearer(device["token"])}
    stored = answer(lean, **body)
    duplicate_lean, duplicate_flask = answer(lean, **body), answer(flask, **body)
    # the same bytes but the skew (the server's clock moved between the two answers), and so
    # perhaps the length: 30.12 and 30.123 s differ by a digit
    ack_lean, ack_flask = json.loads(duplicate_lean[2]), json.loads(duplicate_flask[2])
    assert abs(ack_lean.pop("clock_skew_s") - ack_flask.pop("clock_skew_s")) < 30
    assert headers_but_length(duplicate_lean) == headers_but_length(duplicate_flask)
    assert duplicate_lean[0] == duplicate_flask[0] and ack_lean == ack_flask and ack_lean["status"] == "duplicate"
    assert list(json.loads(duplicate_lean[2])) == list(json.loads(duplicate_flask[2]))  # same field order
    assert stored[0] == 200 and [k for k, _ in stored[1]] == [k for k, _ in duplicate_lean[1]]
    assert json.loads(stored[2])["status"] == "stored"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM heartbeats").scalar_one() == 1

    def refuse(*_args, **_kwargs) -> None:
        raise Overloaded("the server is busy; retry later", retry_after_s=3)

    for app in apps:
        app.extensions["nexmdm"].writer.check_admission = refuse
    rejected = overloaded_count()
    refused_lean, refused_flask = answer(lean, **body), answer(flask, **body)
    assert refused_lean == refused_flask and refused_lean[0] == 503
    assert ("Retry-After", "3") in refused_lean[1]
    assert overloaded_count() == rejected + 2  # counted on both paths


def test_the_lean_path_skips_flask_and_the_flask_path_does_not(apps, admin):
    lean, flask = apps
    seen = []
    for app in apps:
        app.after_request(lambda response, app=app: seen.append(app) or response)
    token = enroll(lean.test_client(), admin, 1)[0]["token"]
    seen.clear()
    answer(lean, json=heartbeat_body(), headers=bearer(token))
    assert seen == []  # no Flask request for a heartbeat on the lean path
    answer(lean, json={}, headers=bearer(token))
    assert seen == [lean]  # ... but its error answers are Flask's (its handlers, its after-request hooks)
    answer(flask, json=heartbeat_body(datetime.now(UTC) - timedelta(seconds=60)), headers=bearer(token))
    assert seen == [lean, flask]
    lean.test_client().get("/healthz")
    assert seen[-1] is lean and len(seen) == 3  # everything else is Flask's
