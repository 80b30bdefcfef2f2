"""Load shedding of the group-commit writer, under gevent as in a gunicorn worker, against the
real database, CoDel-style: a burst is absorbed; a standing queue (the database stalls, the
worker's loop runs late for a whole interval) is shed at once (503 + Retry-After upstream);
admitted again soon after the condition clears; nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ADMIN_KEY  # noqa: F401  (same session database)
from tests.support.helpers import enroll
from tests.support.live import ROOT


def test_group_commit_sheds_quickly_and_recovers(client, admin, engine, database_url):
    device_id = enroll(client, admin, 1)[0]["id"]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.shedding_probe", database_url, str(device_id)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["idle"][0] == "stored"
    # A burst (one 300 ms stall of the loop) is not a standing queue: nothing refused.
    assert out["burst_fraction"] == 0 and out["burst_admitted_of_100"] == 100, out
    # Database stalled with writes queued: nearly every new heartbeat is refused ...
    assert out["stalled_fraction"] >= 0.8 and out["stalled_admitted_of_100"] <= 30, out
    # ... the queued ones were not dropped: they commit once the stall ends, and the refusals stop.
    assert [status for status, _ in out["stuck"]] == ["stored"] * 3, out
    assert out["after_stall_fraction"] == 0 and out["after_stall"][0] == "stored", out
    # CPU saturated for a second: a share of new heartbeats is refused at once (not all: under
    # a retry storm refusing everything would starve the loop of useful work for good) ...
    assert out["shed_fraction"] > 0, out
    assert 0 < out["refused_of_400"] < 400, out
    # ... and none once it keeps time again.
    assert out["shed_fraction_after"] == 0, out
    assert out["after_busy"][0] == "stored", out
    assert out["stats"]["shed"] == (100 - out["stalled_admitted_of_100"]) + out["refused_of_400"]
    with engine.connect() as conn:
        count = conn.exec_driver_sql("SELECT count(*) FROM heartbeats WHERE device_id = %s", (device_id,)).scalar_one()
    assert count == 6 + 8  # idle, 3 stuck, after_stall, after_busy, 2 x 4 lingering; the refused ones were not written
    # Linger: four heartbeats 10 ms apart in one statement, written once the fourth arrived (not
    # after the whole 200 ms); without it, one statement each (or nearly).
    assert out["linger"]["stored"] == ["stored"] * 4 and out["linger"]["flushes"] == 1, out
    assert out["linger"]["first_s"] < 0.15, out
    # (>= 2, not 4: on a busy machine a flush can take longer than the 10 ms between two sends)
    assert out["no_linger"]["stored"] == ["stored"] * 4 and out["no_linger"]["flushes"] >= 2, out
