"""Attacks on the internet-facing server, each reproduced against a live gunicorn
server: every test here failed on the code before its fix."""

from __future__ import annotations

import hashlib
import json
import random
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from api.app import create_app
from db.engine import make_engine
from tests.support.helpers import bearer, enroll, heartbeat_body
from tests.support.live import ROOT, LiveServer, free_port


def _metrics_text(server: LiveServer) -> bytes:
    req = urllib.request.Request(server.admin_url + "/metrics", headers={"x-admin": server.admin_key})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def _workers_rss_bytes(server: LiveServer) -> int:
    """The device plane's workers (the plane that faces the internet)."""
    return sum(p.memory_info().rss for p in psutil.Process(server.proc.pid).children())


def _read_response(sock: socket.socket, buf: bytearray) -> int:
    """Read one HTTP response with a Content-Length body off a keep-alive socket; its status."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    buf[:] = rest[length:]
    return int(head.split(b" ", 2)[1])


def _random_requests(server: LiveServer, count: int, seed: int, clients: int = 8) -> dict[int, int]:
    """``count`` requests, no key, each with a made-up method and path; answers by status."""
    port = int(server.url.rsplit(":", 1)[1])
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def client(index: int, n: int) -> None:
        rnd = random.Random(seed * 100 + index)
        sock, buf = None, bytearray()
        for _ in range(n):
            method = "".join(rnd.choices(string.ascii_uppercase, k=16))
            path = "/" + "".join(rnd.choices(string.ascii_lowercase, k=12))
            if rnd.random() < 0.3:
                path = rnd.choice(["/v1/heartbeat", "/v1/devices", "/metrics"])  # a known route
            elif rnd.random() < 0.5:
                method = rnd.choice(["GET", "POST"])
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
            try:
                status = _read_response(sock, buf)
            except ConnectionError:
                sock.close()
                sock, buf, status = None, bytearray(), 0
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
        if sock is not None:
            sock.close()

    threads = [threading.Thread(target=client, args=(i, count // clients)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def test_made_up_methods_and_paths_do_not_grow_metrics_or_memory(live_server):
    """Before, 3,000 random methods grew /metrics 169 KB -> 8.75 MB and a worker by 94 MB."""
    _random_requests(live_server, 1_000, seed=1)  # warm up: every closed-set series exists now
    size_before = len(_metrics_text(live_server))
    rss_before = _workers_rss_bytes(live_server)
    statuses = _random_requests(live_server, 10_000, seed=2)
    size_after = len(_metrics_text(live_server))
    rss_after = _workers_rss_bytes(live_server)
    assert sum(statuses.values()) == 10_000 and statuses.get(0, 0) < 100, statuses
    assert size_after - size_before < 20_000, (size_before, size_after)
    assert rss_after - rss_before < 20 * 2**20, (rss_before, rss_after)  # before: +228 MB
    text = _metrics_text(live_server).decode()
    assert 'method="other"' in text and 'endpoint="unmatched"' in text


def test_answers_that_carry_a_token_are_not_cached(client, admin):
    """Enrollment and rotation answers carried tokens without Cache-Control."""
    resp = client.post("/v1/devices/enroll", json={"device_uid": "cache-1"}, headers=admin)
    assert resp.status_code == 201 and resp.headers["Cache-Control"] == "no-store"
    device_id = resp.get_json()["devices"][0]["id"]
    resp = client.post(f"/v1/devices/{device_id}/token", headers=admin)
    assert resp.status_code == 201 and resp.headers["Cache-Control"] == "no-store"
    assert "no-store" not in client.get("/healthz").headers.get("Cache-Control", "")


def test_readyz_tells_an_outsider_nothing_about_the_database(settings, caplog):
    """/readyz (no auth) answered with the driver's message: host, port, user."""
    port = free_port()  # nothing listens there
    url = f"postgresql://secret_user@127.0.0.1:{port}/secret_db"
    engine = make_engine(settings, url)
    try:
        app = create_app(settings.with_overrides(database_url=url), engine=engine)
        app.testing = True
        resp = app.test_client().get("/readyz")
    finally:
        engine.dispose()
    assert resp.status_code == 503 and resp.headers["Retry-After"]
    assert resp.get_json() == {"status": "unavailable", "database": "unavailable"}
    body = resp.get_data(as_text=True)
    assert str(port) not in body and "127.0.0.1" not in body and "secret" not in body
    assert str(port) in caplog.text  # the detail is in the log, for the operator


def test_revocation_refuses_every_token_the_device_ever_had_on_every_worker(apps, engine, admin):
    """Rotate, use the old token on another worker, rotate again, revoke: the token
    from two rotations back stayed cached there for up to the overlap (1 h) and was accepted."""
    worker_a = apps()
    worker_b = apps()  # a second worker: its own token cache
    a, b = worker_a.test_client(), worker_b.test_client()
    (device,) = enroll(a, admin, 1)
    first = device["token"]
    second = a.post(f"/v1/devices/{device['id']}/token", headers=admin).get_json()["token"]
    assert b.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(first)).status_code == 200  # cached on b
    third = a.post(f"/v1/devices/{device['id']}/token", headers=admin).get_json()["token"]
    worker_b.extensions["nexmdm"].tokens.sync()  # what b does within TOKEN_SYNC_INTERVAL_S
    # The second rotation ends the first token at once, on every worker.
    resp = b.post("/v1/heartbeat", json=heartbeat_body(battery_pct=11), headers=bearer(first))
    assert resp.status_code == 401, resp.get_json()
    assert b.post("/v1/heartbeat", json=heartbeat_body(battery_pct=12), headers=bearer(second)).status_code == 200
    assert b.post("/v1/heartbeat", json=heartbeat_body(battery_pct=13), headers=bearer(third)).status_code == 200
    revoked_at = a.post(f"/v1/devices/{device['id']}/revoke", headers=admin).get_json()["revoked_at"]
    worker_b.extensions["nexmdm"].tokens.sync()
    for token in (first, second, third):
        for client in (a, b):
            resp = client.post("/v1/heartbeat", json=heartbeat_body(battery_pct=14), headers=bearer(token))
            assert resp.status_code == 401, (token == first, token == second, resp.get_json())
    with engine.connect() as conn:
        last_seen = conn.exec_driver_sql(
            "SELECT received_at FROM device_last_status WHERE device_id = %s", (device["id"],)).scalar_one()
    assert last_seen <= datetime.fromisoformat(revoked_at.replace("Z", "+00:00"))


def test_a_clock_far_ahead_does_not_freeze_the_status(client, admin, engine):
    """One heartbeat 29 min fast was stored 29 min ahead, and the forward-only upsert
    ignored the device's correct heartbeats for 29 minutes (battery stale, then offline)."""
    from scheduler.jobs.reconcile import heal_last_status

    (device,) = enroll(client, admin, 1)
    now = datetime.now(UTC)
    fast = client.post("/v1/heartbeat", json=heartbeat_body(sent_at=now + timedelta(minutes=29), battery_pct=10),
                       headers=bearer(device["token"]))
    assert fast.status_code == 200 and fast.get_json()["status"] == "stored"
    for i, battery in enumerate((50, 60, 70)):
        sent = now + timedelta(seconds=10 * i + 1)
        resp = client.post("/v1/heartbeat", json=heartbeat_body(sent_at=sent, battery_pct=battery),
                           headers=bearer(device["token"]))
        assert resp.get_json()["status"] == "stored"
    before_last = datetime.now(UTC)
    resp = client.post("/v1/heartbeat", json=heartbeat_body(sent_at=now + timedelta(seconds=31), battery_pct=71),
                       headers=bearer(device["token"]))
    assert resp.get_json()["status"] == "stored"
    status = client.get(f"/v1/devices/{device['id']}", headers=admin).get_json()
    assert status["battery_pct"] == 71 and status["online"] is True
    assert datetime.fromisoformat(status["last_seen_at"].replace("Z", "+00:00")) >= before_last
    with engine.begin() as conn:  # the reconcile job agrees: nothing to heal, nothing moved back
        assert heal_last_status(conn).total == 0
    assert client.get(f"/v1/devices/{device['id']}", headers=admin).get_json()["battery_pct"] == 71


def test_bad_input_in_queries_and_names_is_a_4xx(client, admin):
    """?app_version=%00, ?label=%00 and since/until offsets like +20:00 were 500s (with a
    stack trace); a device_uid with a trailing newline was enrolled beside the one without."""
    (device,) = enroll(client, admin, 1, prefix="dev")
    for url in ["/v1/devices?app_version=%00", "/v1/devices?label=%00", "/v1/devices?label=a%00b",
                "/v1/audit?action=%00"]:
        resp = client.get(url, headers=admin)
        assert resp.status_code == 400 and resp.get_json()["error"] == "invalid_parameter", url
    history = f"/v1/devices/{device['id']}/heartbeats"
    resp = client.get(history + "?since=2026-01-01T00:00:00%2B20:00", headers=admin)
    assert resp.status_code == 200 and resp.get_json()["since"] == "2025-12-31T04:00:00Z"
    assert client.get(history + "?until=2026-01-01T00:00:00-23:59", headers=admin).status_code == 200
    resp = client.get(history + "?since=0001-01-01T00:00:00%2B05:00", headers=admin)
    assert resp.status_code == 400 and resp.get_json()["error"] == "invalid_parameter"
    for uid in ["dev-0\n", "dev-x\n", "dev-x\r\n"]:
        resp = client.post("/v1/devices/enroll", json={"device_uid": uid}, headers=admin)
        assert resp.status_code == 422, (uid, resp.status_code)
    resp = client.post("/v1/devices/enroll", json={"device_uid": "dev-y", "labels": ["eu\n"]}, headers=admin)
    assert resp.status_code == 422
    for body in (b'{"device_uid": "\xff"}', b'{"devices": [{"device_uid": "a\xc3"}]}'):
        resp = client.post("/v1/devices/enroll", data=body, content_type="application/json", headers=admin)
        assert resp.status_code == 400 and resp.get_json()["error"] == "malformed_json"
    resp = client.post("/v1/heartbeat", data=b'{"app_version": "\xed\xa0\x80"}', content_type="application/json",
                       headers=bearer(device["token"]))
    assert resp.status_code == 400 and resp.get_json()["error"] == "malformed_json"


def test_a_bad_chunk_size_is_a_400(live_server):
    """A chunked body with a chunk size that is not hex was a 500."""
    port = int(live_server.url.rsplit(":", 1)[1])
    req = urllib.request.Request(live_server.admin_url + "/v1/devices/enroll", method="POST",
                                 data=b'{"device_uid": "chunk-ok"}',
                                 headers={"x-admin": live_server.admin_key, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        token = json.loads(resp.read())["devices"][0]["token"]
    for chunked in (b"zz\r\n{}\r\n0\r\n\r\n", b"-1\r\n{}\r\n0\r\n\r\n", b"2 x\r\n{}\r\n0\r\n\r\n",
                    b"2\r\n{}XX0\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + token.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunked)
            answer = b""
            while b"\r\n\r\n" not in answer:
                part = sock.recv(65536)
                if not part:
                    break
                answer += part
        assert answer.startswith(b"HTTP/1.1 400"), (chunked, answer[:200])
    assert "Traceback" not in live_server.log()


def _verify(manifest: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scheduler", "verify", str(manifest)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_scheduler_verify_reads_only_regular_files_beside_the_manifest(tmp_path):
    """Verify followed a symlink beside a manifest (printing the size and SHA-256 of
    /etc/shadow) and crashed on "file": ".." or a partition name with non-ASCII digits."""
    target = Path("/etc/passwd")
    good = {"partition": "heartbeats_p20260101", "range_start": "2026-01-01", "range_end": "2026-01-02",
            "row_count": 1, "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
            "size_bytes": target.stat().st_size, "file": "heartbeats_p20260101.copy.gz", "columns": ["device_id"],
            "schema_version": "1", "created_at": "2026-01-02T00:00:00Z"}
    (tmp_path / "heartbeats_p20260101.copy.gz").symlink_to(target)
    (tmp_path / "dir.copy.gz").mkdir()
    cases = {
        "symlink": ({}, "not a regular file"),
        "dotdot": ({"file": ".."}, "must not contain a path"),
        "directory": ({"file": "dir.copy.gz"}, "not a regular file"),
        "digits": ({"partition": "heartbeats_p\u0662\u0660\u0662\u0666\u0660\u0661\u0660\u0661"}, "not a heartbeats"),
        "newline": ({"partition": "heartbeats_p20260101\n"}, "not a heartbeats"),
        "count": ({"row_count": "\u0661"}, "must be a int"),
    }
    for name, (change, says) in cases.items():
        manifest = tmp_path / f"{name}.manifest.json"
        manifest.write_text(json.dumps({**good, **change}))
        result = _verify(manifest)
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert "NOT OK" in result.stdout and says in result.stdout, (name, result.stdout)
        assert "Traceback" not in result.stderr and good["sha256"] not in result.stdout, name


@pytest.fixture
def apps(settings, engine):
    """Build apps on the test engine (``apps(**overrides)``), each closed afterwards: an app's
    heartbeat writer holds a connection of the shared engine until it is closed."""
    made = []

    def make(**overrides):
        app = create_app(settings.with_overrides(**overrides), engine=engine)
        app.testing = True
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["nexmdm"].close()


def test_unknown_tokens_never_enter_the_token_cache(apps, engine, admin, monkeypatch):
    """Each bogus token stayed cached (~47,000 -> 5-8 MB a worker), evicted only at
    1,000,000 entries, valid tokens included."""
    from api.auth import TokenCache

    monkeypatch.setattr(TokenCache, "NEGATIVE_MAX_ENTRIES", 100, raising=False)
    app = apps()
    client = app.test_client()
    (device,) = enroll(client, admin, 1)
    assert client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(device["token"])).status_code == 200
    for i in range(500):
        resp = client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(f"nxm_bogus{i:05d}"))
        assert resp.status_code == 401
    tokens = app.extensions["nexmdm"].tokens
    assert len(tokens._entries) == 1  # the valid token only
    assert len(tokens._negative) <= 100  # the bounded negative cache
    resp = client.post("/v1/heartbeat", json=heartbeat_body(battery_pct=3), headers=bearer(device["token"]))
    assert resp.status_code == 200


def test_repeated_auth_failures_from_one_source_get_429(apps, engine, admin):
    """2,000 bad tokens in 2 s got no 429; wrong operator keys neither."""
    app = apps(auth_failure_limit=5, auth_failure_window_s=60.0)
    client = app.test_client()
    (device,) = enroll(client, admin, 1)
    attacker = {"REMOTE_ADDR": "10.0.0.1"}
    for i in range(5):
        resp = client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(f"nxm_guess{i}"),
                           environ_base=attacker)
        assert resp.status_code == 401
    resp = client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer("nxm_guess9"), environ_base=attacker)
    assert resp.status_code == 429 and resp.get_json()["error"] == "too_many_failures"
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    # refused before any look-up, the right token too; another source is not affected
    resp = client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(device["token"]), environ_base=attacker)
    assert resp.status_code == 429
    resp = client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(device["token"]),
                       environ_base={"REMOTE_ADDR": "10.0.0.2"})
    assert resp.status_code == 200
    # operator keys: the same
    prober = {"REMOTE_ADDR": "10.0.0.3"}
    for i in range(5):
        assert client.get("/v1/fleet/summary", headers={"x-admin": f"guess{i}"}, environ_base=prober).status_code == 403
    resp = client.get("/v1/fleet/summary", headers=admin, environ_base=prober)
    assert resp.status_code == 429 and resp.headers["Retry-After"]
    assert client.get("/v1/fleet/summary", headers=admin).status_code == 200


def test_forwarded_for_counts_only_from_a_trusted_proxy(apps, engine):
    """Behind a proxy the client is X-Forwarded-For, but only when the peer is trusted."""
    app = apps(auth_failure_limit=3, trusted_proxies="127.0.0.1, 10.8.0.0/16")
    client = app.test_client()

    def bad(peer: str, forwarded: str) -> int:
        return client.post("/v1/heartbeat", json=heartbeat_body(), headers={**bearer("nxm_x"), "X-Forwarded-For":
                           forwarded}, environ_base={"REMOTE_ADDR": peer}).status_code

    # through the trusted proxy: each client is counted on its own
    assert [bad("127.0.0.1", f"192.0.2.{i}") for i in range(6)] == [401] * 6
    assert [bad("127.0.0.1", "203.0.113.9, 10.8.1.1") for _ in range(4)] == [401, 401, 401, 429]
    # from an untrusted peer the header is ignored: a forged one changes nothing
    assert [bad("198.51.100.7", f"192.0.2.{i}") for i in range(4)] == [401, 401, 401, 429]


def test_one_device_over_its_limit_gets_429_before_any_database_work(apps, engine, admin):
    """One token at 1,730 heartbeats/s was answered in full."""
    from sqlalchemy import event

    from api.throttle import DeviceRateLimit

    app = apps(device_max_per_minute=30, token_sync_interval_s=3600.0)
    # The limiter's clock stands still: the burst and the refusals do not depend on how fast
    # this machine runs the requests.
    app.extensions["nexmdm"].device_limit = DeviceRateLimit(30, clock=lambda: 1000.0)
    client = app.test_client()
    flooder, other = enroll(client, admin, 2)
    now = datetime.now(UTC)
    statuses = [client.post("/v1/heartbeat", json=heartbeat_body(sent_at=now - timedelta(seconds=10 * i)),
                            headers=bearer(flooder["token"])).status_code for i in range(30)]
    assert statuses == [200] * 30  # a burst of DEVICE_MAX_PER_MINUTE is fine
    statements: list[str] = []

    def count(conn, cursor, statement, *rest) -> None:  # noqa: ANN001 - SQLAlchemy's event signature
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        for i in range(50):
            resp = client.post("/v1/heartbeat", json=heartbeat_body(sent_at=now - timedelta(seconds=10 * (30 + i))),
                               headers=bearer(flooder["token"]))
            assert resp.status_code == 429 and resp.get_json()["error"] == "rate_limited"
            assert resp.headers["Retry-After"] == "2"  # when the next one fits (60 s / 30)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert statements == [], statements[:3]  # refused before any database work
    resp = client.post("/v1/heartbeat", json=heartbeat_body(), headers=bearer(other["token"]))
    assert resp.status_code == 200  # the other devices are not affected
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT count(*) FROM heartbeats WHERE device_id = %s",
                                      (flooder["id"],)).scalar_one()
    assert stored == 30


def test_a_flooding_device_is_slowed_to_a_request_a_second_per_connection(database_url, engine, tmp_path):
    """The refusals are held a second (LIMIT_REFUSAL_DELAY_S), so a device flooding over
    a keep-alive connection costs the worker a request a second, not 1,730."""
    import http.client

    from tests.conftest import ADMIN_KEY
    from tests.faults.conftest import enroll_fleet
    from tests.support.live import start_server, stop_server

    server = start_server(database_url, ADMIN_KEY, tmp_path, workers=1, DEVICE_MAX_PER_MINUTE="30")
    try:
        (device,) = enroll_fleet(server, 1, prefix="flood")
        conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
        statuses, refused_s = [], []
        body = json.dumps(heartbeat_body()).encode()
        ends = time.monotonic() + 4
        while time.monotonic() < ends:
            started = time.monotonic()
            conn.request("POST", "/v1/heartbeat", body=body, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {device.token}"})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
            if resp.status == 429:
                refused_s.append(time.monotonic() - started)
        conn.close()
    finally:
        stop_server(server)
    assert statuses.count(200) <= 32 and 2 <= statuses.count(429) <= 5, statuses
    assert min(refused_s) >= 0.9, refused_s
