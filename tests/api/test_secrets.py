"""Tokens and the admin key never appear in the server's log (at debug level, with access log)
nor in any answer except the one that hands a token out (enroll, rotate)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.api.test_auth import admin_routes
from tests.conftest import ADMIN_KEY
from tests.faults.conftest import enroll_fleet
from tests.support.helpers import heartbeat_body
from tests.support.live import start_server, stop_server


def call(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode("utf-8", "replace") + str(dict(resp.headers))
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace") + str(dict(err.headers))


def test_secrets_never_in_logs_or_answers(app, database_url, engine, tmp_path):
    server = start_server(
        database_url, ADMIN_KEY, tmp_path, workers=2, LOG_LEVEL="DEBUG",
        GUNICORN_CMD_ARGS="--log-level debug --access-logfile -",
    )
    answers: list[str] = []
    wrong_key = "wrong-admin-key-Zq8v1Xk2"
    bogus_token = "nxm_bogusTokenValue_0123456789abcdefghijklmnop"
    try:
        devices = enroll_fleet(server, 3, prefix="secret")
        victim = devices[2]
        _, text = call(server.admin_url + f"/v1/devices/{victim.id}/revoke", "POST", headers={"x-admin": ADMIN_KEY})
        answers.append(text)
        json_ct = {"Content-Type": "application/json"}
        good = json.dumps(heartbeat_body()).encode()
        for dev in devices:
            auth = {"Authorization": f"Bearer {dev.token}", **json_ct}
            for body in (good, b"{not json", b'{"sent_at": 5}', b"[]", b"x" * 20000):
                answers.append(call(server.url + "/v1/heartbeat", "POST", body, auth)[1])
            hb_url = server.url + "/v1/heartbeat"
            answers.append(call(hb_url, "POST", good, {"Authorization": f"Bearer {dev.token}"})[1])
            answers.append(call(hb_url, "POST", good, {"Authorization": dev.token, **json_ct})[1])
        for auth in (f"Bearer {bogus_token}", f"Basic {bogus_token}", f"Bearer {bogus_token * 10}"):
            answers.append(call(server.url + "/v1/heartbeat", "POST", good, {"Authorization": auth, **json_ct})[1])
        for method, url in admin_routes(app):
            url = url.replace("/1", f"/{devices[0].id}")
            for headers in ({}, {"x-admin": wrong_key}, {"x-admin": devices[0].token}):
                answers.append(call(server.admin_url + url, method, b"{}", {**headers, **json_ct})[1])
            if method == "GET":  # the operator's own reads (status, lists, metrics...) too
                answers.append(call(server.admin_url + url + "?since=bad", method, None, {"x-admin": ADMIN_KEY})[1])
                answers.append(call(server.admin_url + url, method, None, {"x-admin": ADMIN_KEY})[1])
        for path in ("/healthz", "/readyz", "/openapi.json", "/nope", "/metrics"):
            answers.append(call(server.url + path)[1])
            answers.append(call(server.admin_url + path)[1])
    finally:
        stop_server(server)
    log = server.log()
    assert "GET /healthz" in log or "/v1/heartbeat" in log  # the access log was on: the check means something
    secrets = [ADMIN_KEY, wrong_key, bogus_token] + [d.token for d in devices]
    secrets += [d.token.removeprefix("nxm_") for d in devices]
    for secret in secrets:
        assert secret not in log, f"a secret appears in the server log: {secret[:6]}..."
        for answer in answers:
            assert secret not in answer, f"a secret appears in an answer: {answer[:200]}"
