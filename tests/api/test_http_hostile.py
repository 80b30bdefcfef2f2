"""Hostile HTTP against a live server (gunicorn + gevent, real PostgreSQL). Raw requests: header
injection, request smuggling shapes, oversized request lines and headers, truncated bodies, each
refused with a 4xx (or the connection closed), no stack trace, no injected header echoed, and the
server keeps serving. schemathesis against /openapi.json: no 5xx, no stack trace, every error a
JSON {error, detail}, documented status codes and response shapes, nothing written for a
rejected request; bounded (a few examples per operation, derandomized). In-process bad input:
tests/api/test_bad_input.py."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ADMIN_KEY
from tests.faults.conftest import enroll_fleet
from tests.support.helpers import heartbeat_body
from tests.support.live import call, start_server, stop_server

BODY = json.dumps(heartbeat_body()).encode()
HOSTILE = {
    "bare CR in header value": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\rSet-Cookie: evil=1\r\n\r\n",
    "NUL in header value": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "header name with space": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n",
    "obsolete line folding": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "huge header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n",
    "too many headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    "huge request line": b"GET /healthz?" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "two different Content-Length": b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 5\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY,
    "Content-Length and chunked": b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    b"GET /v1/fleet/summary HTTP/1.1\r\nHost: x\r\n\r\n",
    "negative Content-Length": b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "non-numeric Content-Length": b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
    "invalid method": b"G\x00ET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad HTTP version": b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    "CRLF in the URL": b"GET /v1/devices?status=a%0d%0aSet-Cookie:%20evil=1 HTTP/1.1\r\n"
    b"Host: x\r\nx-admin: nope\r\n\r\n",
    "injected admin header via token": b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer abc\rx-admin: guess\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY,
}


def exchange(url: str, raw: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close early on a huge request; what it answered still counts
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)


@pytest.fixture(scope="module")
def hostile_server(database_url, tmp_path_factory):
    from tests.conftest import ADMIN_KEY
    from tests.support.live import start_server, stop_server

    server = start_server(database_url, ADMIN_KEY, tmp_path_factory.mktemp("hostile"), workers=1)
    yield server
    stop_server(server)
    assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_http(hostile_server, name):
    answer = exchange(hostile_server.url, HOSTILE[name])
    status_line, _, rest = answer.partition(b"\r\n")
    head = rest.partition(b"\r\n\r\n")[0].lower()
    if answer:  # a refusal, never a success of the smuggled or injected request
        status = int(status_line.split()[1])
        assert 400 <= status < 500, (name, status_line)
        # JSON like every other error, gunicorn's own refusals (414, 431, 400) included.
        assert b"content-type: application/json" in head, (name, answer[:300])
        assert set(json.loads(answer.partition(b"\r\n\r\n")[2])) == {"error", "detail"}, (name, answer[:300])
    assert b"traceback" not in answer.lower() and b'file "' not in answer.lower()
    assert b"set-cookie" not in head and b"evil" not in head
    assert b'"total"' not in answer  # the smuggled fleet summary was never answered
    with urllib.request.urlopen(hostile_server.url + "/healthz", timeout=5) as resp:
        assert resp.status == 200


def test_truncated_body_does_not_hold_the_server(hostile_server):
    host, port = hostile_server.url.removeprefix("http://").split(":")
    socks = []
    for _ in range(20):  # bodies announced but never finished
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer x\r\nContent-Length: 1000\r\n\r\n{\"sent_at\"")
        socks.append(sock)
    try:
        with urllib.request.urlopen(hostile_server.url + "/readyz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        for sock in socks:
            sock.close()


EXAMPLES_PER_OPERATION = 15
CLI_EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def fuzz_server(database_url, tmp_path_factory):
    server = start_server(database_url, ADMIN_KEY, tmp_path_factory.mktemp("fuzz"), workers=1)
    devices = enroll_fleet(server, 2, prefix=f"fuzz-{uuid.uuid4().hex[:8]}")
    yield server, devices
    stop_server(server)
    log = server.log()
    assert "Traceback" not in log, log[-3000:]


def counts(engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        return tuple(conn.exec_driver_sql(
            "SELECT (SELECT count(*) FROM heartbeats), (SELECT count(*) FROM devices), "
            "(SELECT count(*) FROM devices WHERE revoked_at IS NOT NULL)"
        ).one())


def test_openapi_operations(fuzz_server, session_engine):
    """Every operation of the live document, fuzzed. (schemathesis's pytest plugin does not
    run under pytest 9, so its strategies are driven with hypothesis directly.)"""
    server, devices = fuzz_server
    schema = schemathesis.openapi.from_url(server.admin_url + "/openapi.json")  # the operator plane's
    headers = {"x-admin": ADMIN_KEY, "Authorization": f"Bearer {devices[0].token}"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9

    for operation in operations:
        # Each operation goes to the plane that serves it, as the document says.
        plane = operation.definition.raw["x-nexmdm-plane"]
        base_url = server.url if plane in ("device", "both") else server.admin_url

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:
            before = counts(session_engine)
            response = case.call(base_url=base_url, headers=headers, timeout=10)  # noqa: B023 - run at once
            case.validate_response(response, checks=checks)
            text = response.text
            assert "Traceback" not in text and 'File "' not in text
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error", "detail"}, body
                assert counts(session_engine) == before, (case.method, case.path, response.status_code)

        fuzz()


def test_each_plane_answers_the_others_endpoints_with_a_404_naming_it(fuzz_server):
    server, devices = fuzz_server
    document = call(server.admin_url + "/openapi.json")[1]
    wrong = {"device": server.admin_url, "operator": server.url}
    checked = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            plane = operation["x-nexmdm-plane"]
            if plane == "both":
                continue
            status, body = call(wrong[plane] + re.sub(r"\{[a-z_]+\}", str(devices[0].id), path), method.upper(),
                                {} if method == "post" else None, {"x-admin": ADMIN_KEY})
            assert status == 404 and body["error"] == "wrong_plane", (method, path, status, body)
            assert f"served by the {plane} plane" in body["detail"], body
            checked += 1
    assert checked >= 15

def test_openapi_document_serves_and_covers_every_route(client, app):
    """/openapi.json answers (it failed with a 500 on the enroll union before) and documents
    every route, so the fuzzing above reaches new endpoints too."""
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    documented = {(m.upper(), p) for p, ops in resp.get_json()["paths"].items() for m in ops}
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("static", "openapi.openapi"):
            continue
        path = rule.rule.replace("<int:", "{").replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (method, path) in documented, (method, path)


def test_schemathesis_cli_all_checks(fuzz_server, tmp_path):
    """Schemathesis' own command line with every check (positive and negative data, undeclared
    methods and their Allow header, declared statuses and bounds, auth, stateful links), as an
    operator would run it, once per plane against the operations that plane serves (the
    document's x-nexmdm-plane): it reports no failure. Bounded: examples per operation, two
    workers, a request timeout and a deadline; a fixed seed so a failure can be replayed."""
    server, devices = fuzz_server
    document = call(server.admin_url + "/openapi.json")[1]
    device_only = sorted(path for path, ops in document["paths"].items()
                         if {op["x-nexmdm-plane"] for op in ops.values()} == {"device"})
    only_device = "^(" + "|".join(re.escape(p) for p in device_only) + ")$"
    runs = [
        (server.admin_url, ["--exclude-path-regex", only_device]),  # operator plane: all but the device's
        (server.url, ["--include-path-regex", only_device]),  # device plane: its own
    ]
    tested_total = 0
    for base_url, selection in runs:
        cmd = [
            str(Path(sys.executable).with_name("schemathesis")), "run", server.admin_url + "/openapi.json",
            "--url", base_url, *selection, "--checks", "all",
            "-H", f"x-admin: {ADMIN_KEY}", "-H", f"Authorization: Bearer {devices[0].token}",
            "--max-examples", str(CLI_EXAMPLES_PER_OPERATION), "--seed", "19", "--workers", "2",
            "--request-timeout", "10", "--generation-database", "none", "--no-color",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
        out = result.stdout
        summary = out[out.find("===== FAILURES"):][:6000] if "FAILURES" in out else out[-3000:]
        assert result.returncode == 0, base_url + "\n" + summary + result.stderr[-2000:]
        counts_seen = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", out)
        assert counts_seen, out[-2000:]
        selected, total, tested = map(int, counts_seen.groups())
        assert tested == selected > 0, out[-2000:]
        tested_total += tested
    # Every operation schemathesis finds in the document ran, on a plane that serves it.
    assert tested_total == total >= 16, (tested_total, total)
