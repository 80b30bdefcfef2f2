"""schemathesis against /openapi.json on a live server (gunicorn, gevent, real PostgreSQL):
no 5xx, no stack trace, every error a JSON {error, detail}, documented status codes and
response shapes, and nothing written for a rejected request. Bounded: a few examples per
operation, derandomized."""

from __future__ import annotations

import re
import subprocess
import sys
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

from tests.api.test_live_server import call
from tests.conftest import ADMIN_KEY
from tests.faults.conftest import enroll_fleet, stop_server
from tests.support.live import start_server

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
