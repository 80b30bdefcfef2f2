"""A carrier outage: ``--outage-pct P --outage-at S [--outage-for D]`` silences P % of the fleet
(chosen with the run's seed) from second S of the load for D seconds, then lets it report again.

After the run, ``check_outage`` asks the server's event log (GET /v1/events) whether it raised
exactly those ``device_offline`` events — one for every silenced device, none for a device that
kept reporting (flaky devices that dropped offline on their own are set aside) — and a
``device_online`` for every silenced device once it returned. The server needs
OFFLINE_AFTER_SECONDS plus one EVENTS_INTERVAL_S to notice a silence, so D must be longer than
that, and the load must go on for a job interval after the outage ends (events are counted
while the load runs: after it, the whole fleet falls silent). The check waits up to
``--outage-grace`` seconds for the server's events job.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from simulator.server import AdminApi, UsageError


@dataclass(frozen=True)
class OutagePlan:
    """Which devices (by fleet index) fall silent, from when and for how long (run seconds)."""

    pct: float
    at_s: float
    for_s: float
    indexes: frozenset[int]

    def silences(self, index: int, run_s: float) -> bool:
        """Whether device ``index`` is silent at ``run_s`` seconds into the load."""
        return index in self.indexes and self.at_s <= run_s < self.at_s + self.for_s


def plan_outage(devices: int, pct: float, at_s: float, for_s: float, seed: int) -> OutagePlan:
    """Pick ``pct`` % of ``devices`` (at least one) with a stream of its own: the rest of the
    fleet's behaviour is the same with or without an outage."""
    if not 0 < pct <= 100:
        raise UsageError("--outage-pct must be within (0, 100]")
    if at_s < 0 or for_s <= 0:
        raise UsageError("--outage-at must not be negative and --outage-for must be positive")
    count = max(1, round(devices * pct / 100))
    return OutagePlan(pct, at_s, for_s, frozenset(random.Random(seed + 2).sample(range(devices), count)))


def _stamp(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _event_devices(api: AdminApi, kind: str, since: datetime, until: datetime, fleet: set[int]) -> set[int]:
    found: set[int] = set()
    after = 0
    window = f"since={_stamp(since)}&until={_stamp(until)}"
    while True:
        status, body = api.call("GET", f"/v1/events?type={kind}&{window}&after={after}&limit=1000")
        if status != 200 or not isinstance(body, dict):
            raise UsageError(f"GET /v1/events answered {status}: {body}")
        found |= {e["device_id"] for e in body["events"] if e["device_id"] in fleet}
        if body.get("next_after") is None:
            return found
        after = body["next_after"]


def check_outage(api: AdminApi, plan: OutagePlan, load_started_at: datetime, load_s: float, device_ids: list[int],
                 flaky_offline: set[int], grace_s: float, poll_s: float = 1.0) -> dict[str, Any]:
    """Compare the server's offline and online events during the load (the whole fleet falls
    silent after it) with the outage; waits up to ``grace_s`` for the server's last job runs.
    ``device_ids[i]`` is the server's id of fleet index i; ``flaky_offline`` are ids of devices
    that went silent by themselves during the run."""
    silenced = {device_ids[i] for i in plan.indexes}
    fleet = set(device_ids)
    since = load_started_at + timedelta(seconds=plan.at_s)
    returned_at = since + timedelta(seconds=plan.for_s)
    until = load_started_at + timedelta(seconds=load_s)
    deadline = time.monotonic() + grace_s
    while True:
        offline = _event_devices(api, "device_offline", since, until, fleet)
        online = _event_devices(api, "device_online", returned_at, until, fleet) & silenced
        missing = silenced - offline
        unexpected = offline - silenced - flaky_offline
        not_back = silenced - online
        exact = not missing and not unexpected and not not_back
        if exact or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return {
        "pct": plan.pct, "at_s": plan.at_s, "for_s": plan.for_s, "silenced": len(silenced),
        "offline_events": len(offline & silenced), "missing_offline": sorted(missing)[:20],
        "unexpected_offline": sorted(unexpected)[:20], "online_events": len(online),
        "missing_online": sorted(not_back)[:20], "flaky_offline_ignored": len(offline & flaky_offline - silenced),
        "exact": exact,
        "summary": (f"server raised exactly the {len(silenced):,} offline events and their online events"
                    if exact else
                    f"MISMATCH: {len(missing):,} silenced without device_offline, {len(unexpected):,} "
                    f"device_offline for devices that kept reporting, {len(not_back):,} returned without "
                    "device_online"),
    }
