"""In the real server (one gevent worker doing both): a receiver that holds every request past
the timeout does not slow heartbeats down; the CLI adds, lists, reads the log of and deletes a
webhook; the receiver recovers and gets its batch."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from sqlalchemy import Engine

from api.webhooks_cli import run as run_cli
from tests.conftest import ADMIN_KEY
from tests.faults.conftest import enroll_fleet
from tests.support.helpers import heartbeat_body
from tests.support.live import ROOT, start_server
from tests.support.receiver import HANG, Receiver


def cli(server_url: str, *args: str) -> dict:
    """``python -m api webhooks ...`` as a command (the entry point, exit code and output)."""
    proc = subprocess.run([sys.executable, "-m", "api", "webhooks", "--url", server_url, "--admin-key", ADMIN_KEY,
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def cli_fast(server_url: str, *args: str) -> dict:
    """The same command in this process (no interpreter start-up: for polling)."""
    out = io.StringIO()
    assert run_cli(["--url", server_url, "--admin-key", ADMIN_KEY, *args], out=out) == 0
    return json.loads(out.getvalue())


def post_heartbeat(url: str, token: str) -> float:
    req = urllib.request.Request(url + "/v1/heartbeat", data=json.dumps(heartbeat_body()).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    return time.perf_counter() - started


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_hanging_receiver_never_slows_heartbeats(database_url: str, engine: Engine, tmp_path: Path) -> None:
    receiver = Receiver(script=[HANG] * 2, hang_s=4.0).start()
    # One process serving both planes with one gevent worker: the delivery and the heartbeats
    # share one event loop, the hardest case (split, they are not even in the same process).
    server = start_server(database_url, ADMIN_KEY, tmp_path, workers=1, split=False, WEBHOOKS_ENABLED="true",
                          EVENTS_INTERVAL_S="1", WEBHOOK_TIMEOUT_S="2.5", WEBHOOK_POLL_INTERVAL_S="0.5",
                          WEBHOOK_BACKOFF_BASE_S="0.5")
    try:
        hook = cli(server.url, "add", receiver.url, "--type", "device_online")
        assert hook["secret"].startswith("whsec_")
        listed = cli_fast(server.url, "list")["webhooks"]
        assert [w["id"] for w in listed] == [hook["id"]] and "secret" not in listed[0]

        devices = enroll_fleet(server, 5, prefix="hook")
        for device in devices:
            post_heartbeat(server.url, device.token)
        wait_until(lambda: receiver.received, 15, "the first delivery")  # and now it hangs for 4 s
        hung_at = time.monotonic()
        latencies = []
        while time.monotonic() - hung_at < 2.0:  # within the hang, which outlasts the 2.5 s timeout
            latencies.append(post_heartbeat(server.url, devices[len(latencies) % 5].token))
        # Had the delivery blocked the worker, these would have waited for the receiver (seconds).
        assert len(latencies) >= 10 and max(latencies) < 2.0, latencies

        # The five online events came in one job run or two (one or two batches).
        wait_until(lambda: sum(d["event_count"] for d in cli_fast(
            server.url, "deliveries", str(hook["id"]), "--status", "delivered")["deliveries"]) == 5,
            30, "the retries and the delivered batches")
        log = cli(server.url, "deliveries", str(hook["id"]))["deliveries"]
        head = log[-1]  # the oldest: the one that met the hanging receiver
        assert head["attempts"] == 3 and all(d["status"] == "delivered" for d in log)
        assert [a["error"] is not None and "timed out" in a["error"] for a in head["attempt_log"]] == [
            True, True, False]
        keys = Counter(r.key for r in receiver.received)  # three receipts of that batch, recognisable as one
        assert keys == {d["idempotency_key"]: 3 if d is head else 1 for d in log}
        assert cli_fast(server.url, "delete", str(hook["id"]))["id"] == hook["id"]
        assert cli_fast(server.url, "list")["webhooks"] == []
    finally:
        server.stop()
        receiver.stop()
