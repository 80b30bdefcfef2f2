"""Slow and idle clients without a proxy in front: while 10,000 sockets send
request headers a byte every few seconds (slowloris, reconnecting whenever the server ends one),
heartbeats on fresh connections keep p99 < 150 ms. Before, the worker's 4,000 connections each
filled up with them and every new client waited (healthz timed out; heartbeats waited 25 s)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from tests.faults.conftest import enroll_fleet
from tests.faults.report import ScenarioRow, record
from tests.support.helpers import heartbeat_body
from tests.support.live import ROOT
from tests.support.metrics_scrape import parse

pytestmark = pytest.mark.slow

SLOW_SOCKETS = 10_000
RATE_PER_S = 20
MEASURE_S = 20


def _fresh_heartbeat(port: int, token: str, intended: float) -> tuple[int, float]:
    """One heartbeat on a new connection; (status, seconds from the intended send time)."""
    delay = intended - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    body = json.dumps(heartbeat_body(sent_at=datetime.now(UTC))).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/heartbeat", body=body,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        status = conn.getresponse().status
    except OSError:
        status = 0
    finally:
        conn.close()
    return status, time.monotonic() - intended


def test_heartbeats_keep_their_latency_while_10000_sockets_send_headers_slowly(fault_servers):
    server = fault_servers(workers=2)
    port = int(server.url.rsplit(":", 1)[1])
    tokens = [d.token for d in enroll_fleet(server, 50, prefix="slow")]
    attacker = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.slowloris", "127.0.0.1", str(port), str(SLOW_SOCKETS),
         str(MEASURE_S + 14)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(12)  # the attack ramps up (1,000 sockets/s) and holds
        start = time.monotonic() + 0.1
        n = RATE_PER_S * MEASURE_S
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(lambda i: _fresh_heartbeat(port, tokens[i % len(tokens)], start + i / RATE_PER_S),
                                    range(n)))
        out, _ = attacker.communicate(timeout=60)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    attack = json.loads(out.strip().splitlines()[-1])
    latencies = sorted(lat for status, lat in results if status == 200)
    failures = [status for status, _ in results if status != 200]
    p50, p99 = latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99) - 1] * 1000
    req = urllib.request.Request(server.admin_url + "/metrics", headers={"x-admin": server.admin_key})
    with urllib.request.urlopen(req, timeout=30) as resp:
        scraped = parse(resp.read().decode())
    closed = {reason: scraped.value("nexmdm_http_connections_closed_total", reason=reason)
              for reason in ("shed", "refused", "header_timeout", "idle_timeout", "body_timeout")}
    note = (f"{SLOW_SOCKETS:,} slow sockets (most open {attack['most_open']:,}, reopened "
            f"{attack['ended_by_server']:,}x); fresh-connection heartbeats p50 {p50:.1f} ms p99 {p99:.1f} ms; "
            f"server closed: " + ", ".join(f"{k} {int(v)}" for k, v in closed.items()))
    print(note)
    record(ScenarioRow("slowloris (10,000 slow sockets)", n, len(latencies), 0, 0, None, note))
    assert attack["most_open"] >= SLOW_SOCKETS * 0.9, attack  # the attack did hold its sockets open
    assert not failures, (len(failures), failures[:10], note)
    assert closed["header_timeout"] > 0, note  # the server ended slow requests itself
    assert p99 < 150, note
