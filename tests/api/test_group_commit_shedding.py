"""Load shedding of the group-commit writer, under gevent as in a gunicorn worker, against the
real database: a burst is absorbed; a standing queue (the database stalls, the worker's loop
runs late for a whole interval) limits what is admitted at once (503 + Retry-After upstream for
the rest); all admitted again soon after the condition clears; nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys

from api.shedding import LIMIT_FLOOR
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
    assert not out["burst_overloaded"] and out["burst_admitted_of_100"] == 100, out
    # Database stalled with writes queued: nothing is acknowledged, so the limit is at its floor
    # and nearly every new heartbeat is refused ...
    assert out["stalled"] == {"overloaded": True, "limit": LIMIT_FLOOR}, out
    assert out["stalled_admitted_of_100"] == LIMIT_FLOOR, out
    # ... the queued ones were not dropped: they commit once the stall ends, and the refusals stop.
    assert [status for status, _ in out["stuck"]] == ["stored"] * 3, out
    assert not out["after_stall_overloaded"] and out["after_stall"][0] == "stored", out
    # CPU saturated for a second: those beyond the limit are refused at once (not all: refusing
    # everything would starve the loop of useful work for good) ...
    assert out["busy"]["overloaded"], out
    assert out["refused_of_400"] == 400 - out["busy"]["limit"], out
    # ... and none once it keeps time again.
    assert out["busy_after"] == {"overloaded": False, "refused_share": 0.0}, out
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
