"""What a simulated device does: when it sends (the open-loop schedule), what it reports
(battery, network, signal, app version), how it connects, how a flaky one misbehaves, how
its clock may be off, when it resends and retries, and what an operator reads meanwhile.

Everything here is pure and deterministic for a given ``random.Random``: no I/O, no clock
reads except where a function takes ``now``. The runner (runner.py) decides when to call it.

Schedule: device *i* becomes active at ``ramp_up_s * i / n`` and sends first at a uniformly
random point within one interval after that, so first sends are spread over one interval (no
thundering herd). Each later send is intended at ``previous intended + interval ± jitter``
(uniform): the schedule follows intended times, not the server's answers (open loop).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

NETWORKS = ("wifi", "wifi", "wifi", "cellular", "cellular", "ethernet")

# How devices hold their TCP connections (--connections, --connection-per-device, --new-connection):
POOLED = "pooled"  # heartbeats share at most --connections keep-alive connections (a pooling proxy)
PER_DEVICE = "per-device"  # each device keeps its own connection open between heartbeats
NEW_CONNECTION = "new-connection"  # a new TCP connection for every heartbeat (a phone behind NAT)
CONNECTION_MODES = (POOLED, PER_DEVICE, NEW_CONNECTION)

# Failures a device retries with the same body (4xx answers are final).
RETRYABLE_KINDS = frozenset({"timeout", "connection", "bad_answer"})


def first_send_offset_s(index: int, n_devices: int, interval_s: float, ramp_up_s: float, rng: random.Random) -> float:
    """When device ``index`` of ``n_devices`` first sends, in seconds after the run starts."""
    activation = ramp_up_s * index / n_devices if n_devices else 0.0
    return activation + rng.random() * interval_s


def next_send_s(previous_intended_s: float, interval_s: float, jitter_s: float, rng: random.Random) -> float:
    """The next intended send time: one interval after the previous *intended* one, ± jitter."""
    return previous_intended_s + interval_s + (2.0 * rng.random() - 1.0) * jitter_s


def retry_delay_s(attempt: int, retry_after_s: float | None, rng: random.Random, base_s: float = 0.25,
                  cap_s: float = 30.0) -> float:
    """Delay before retry number ``attempt`` (1-based) after a failure: exponential backoff
    with jitter, never sooner than the server's Retry-After."""
    backoff = min(cap_s, base_s * (2 ** (attempt - 1)))
    floor = retry_after_s if retry_after_s is not None else 0.0
    return max(floor, backoff) * (1.0 + 0.5 * rng.random())


def is_retryable(kind: str) -> bool:
    """Whether a failed send of this error kind is retried: timeouts, dropped connections,
    unreadable answers and 5xx answers are; client errors are not."""
    return kind in RETRYABLE_KINDS or kind.startswith("http_5")


def resend_delay_s(interval_s: float, rng: random.Random) -> float:
    """How soon a flaky device resends a heartbeat whose answer it lost: 0.5-1.5 × min(2 s,
    a quarter interval)."""
    return min(2.0, interval_s / 4) * (0.5 + rng.random())


def clock_offsets_s(n_devices: int, skewed_share: float, rng: random.Random) -> list[float]:
    """Per device, how far its clock is off: 0 for most, 10-60 minutes either way for
    ``skewed_share`` of them (beyond MAX_CLOCK_SKEW_SECONDS the server shifts the device's
    ``sent_at`` by the skew rounded to whole hours before it picks the dedup bucket:
    api.heartbeat_parsing.choose_bucket)."""
    offsets = []
    for _ in range(n_devices):
        offset = 0.0
        if rng.random() < skewed_share:
            offset = rng.choice((-1, 1)) * rng.uniform(600, 3600)
        offsets.append(offset)
    return offsets


@dataclass(frozen=True)
class ReadMix:
    """What operators read while the fleet reports, as weights per endpoint (Locust's task
    weights). The default: mostly single-device status, some fleet lists and summaries."""

    device_status: float = 70.0
    fleet_list: float = 15.0
    fleet_summary: float = 15.0

    @classmethod
    def parse(cls, text: str) -> ReadMix:
        """``device_status:50,fleet_summary:5`` (endpoints left out weigh 0); ValueError if bad."""
        weights = dict.fromkeys(cls.__dataclass_fields__, 0.0)
        for part in text.split(","):
            name, _, value = part.partition(":")
            name = name.strip()
            if name not in weights:
                raise ValueError(f"unknown read endpoint {name!r}; choose from {', '.join(weights)}")
            weights[name] = float(value)
            if weights[name] < 0:
                raise ValueError(f"the weight of {name} must not be negative")
        if not sum(weights.values()):
            raise ValueError("at least one read endpoint needs a positive weight")
        return cls(**weights)

    def pick(self, device_id: int, rng: random.Random) -> tuple[str, bytes]:
        """(endpoint name, request path) of one read; ``device_id`` for a device-status read."""
        total = self.device_status + self.fleet_list + self.fleet_summary
        pick = rng.random() * total
        if pick < self.device_status:
            return "device_status", b"/v1/devices/%d" % device_id
        if pick < self.device_status + self.fleet_list:
            return "fleet_list", b"/v1/devices?limit=50&status=online"
        return "fleet_summary", b"/v1/fleet/summary"


@dataclass(frozen=True)
class Behaviour:
    """Fleet-wide behaviour knobs."""

    interval_s: float = 60.0
    jitter_s: float = 15.0
    flaky_share: float = 0.05
    lost_answer_prob: float = 0.2  # of a flaky device's sends
    offline_prob: float = 0.02  # per send of a flaky device: go offline for a while
    offline_intervals: tuple[int, int] = (2, 6)
    base_version: str = "1.0.0"
    rollout_version: str = "1.1.0"
    rollout_start_s: float = 0.0  # run time at which the rollout starts
    rollout_end_s: float = 0.0  # ... and has reached every device
    connection_mode: str = POOLED
    read_mix: ReadMix = ReadMix()


class Device:
    """One simulated device: identity, token, and the state it reports."""

    __slots__ = (
        "index", "device_id", "device_uid", "auth_header", "battery_pct", "charging", "network",
        "signal_dbm", "app_version", "uptime_s", "free_storage_mb", "flaky", "offline_until_s",
        "rollout_at", "os_version", "clock_offset_s",
    )

    def __init__(self, index: int, device_id: int, device_uid: str, token: str, rng: random.Random,
                 flaky: bool, rollout_at: float) -> None:
        self.index = index
        self.device_id = device_id
        self.device_uid = device_uid
        self.auth_header = f"Authorization: Bearer {token}\r\n".encode()
        self.battery_pct = rng.randint(20, 100)
        self.charging = rng.random() < 0.2
        self.network = rng.choice(NETWORKS)
        self.signal_dbm = rng.randint(-100, -45)
        self.app_version = ""
        self.uptime_s = rng.randint(600, 30 * 86400)
        self.free_storage_mb = rng.randint(500, 64_000)
        self.flaky = flaky
        self.offline_until_s = -1.0
        self.rollout_at = rollout_at  # rollout progress (0..1) at which this device updates
        self.os_version = rng.choice(("13", "14", "14", "15"))
        self.clock_offset_s = 0.0  # a device whose clock is wrong (set by the runner)

    def advance(self, behaviour: Behaviour, run_s: float, rng: random.Random) -> None:
        """Move the device's state on by one heartbeat interval (one device-minute)."""
        if self.charging:
            self.battery_pct = min(100, self.battery_pct + rng.randint(1, 3))
            if self.battery_pct >= 100 or rng.random() < 0.03:
                self.charging = False
        else:
            self.battery_pct = max(0, self.battery_pct - (1 if rng.random() < 0.4 else 0))
            if (self.battery_pct < 15 and rng.random() < 0.3) or rng.random() < 0.005:
                self.charging = True
        if rng.random() < 0.05:
            self.network = rng.choice(NETWORKS)
        self.signal_dbm = max(-130, min(-30, self.signal_dbm + rng.randint(-4, 4)))
        self.uptime_s += 60
        if rng.random() < 0.0005:
            self.uptime_s = rng.randint(30, 300)  # rebooted
        self.free_storage_mb = max(0, self.free_storage_mb + rng.randint(-20, 15))
        self.app_version = version_at(behaviour, run_s, self.rollout_at)

    def is_offline(self, run_s: float) -> bool:
        """A flaky device that has dropped off the network sends nothing."""
        return run_s < self.offline_until_s

    def maybe_go_offline(self, behaviour: Behaviour, run_s: float, rng: random.Random) -> bool:
        """A flaky device sometimes drops offline for a few intervals; True when it just did."""
        if self.flaky and rng.random() < behaviour.offline_prob:
            lo, hi = behaviour.offline_intervals
            self.offline_until_s = run_s + rng.uniform(lo, hi) * behaviour.interval_s
            return True
        return False

    def loses_answer(self, behaviour: Behaviour, rng: random.Random) -> bool:
        """Whether this send's answer gets lost (the device then resends the same body)."""
        return self.flaky and rng.random() < behaviour.lost_answer_prob

    def body(self, sent_at: str) -> bytes:
        """The heartbeat JSON for this device's current state."""
        network = self.network
        signal = b"null" if network == "ethernet" else str(self.signal_dbm).encode()
        return _BODY % (
            sent_at.encode(), self.battery_pct, b"true" if self.charging else b"false", network.encode(),
            signal, self.app_version.encode(), self.os_version.encode(), self.uptime_s, self.free_storage_mb,
        )


_BODY = (
    b'{"sent_at":"%s","battery_pct":%d,"charging":%s,"network_type":"%s","signal_dbm":%s,'
    b'"app_version":"%s","os_version":"%s","uptime_s":%d,"free_storage_mb":%d}'
)


def version_at(behaviour: Behaviour, run_s: float, rollout_at: float) -> str:
    """The app version a device runs at ``run_s``: the rollout reaches a linearly growing share
    of the fleet between rollout_start_s and rollout_end_s."""
    start, end = behaviour.rollout_start_s, behaviour.rollout_end_s
    if end <= 0 or run_s < start:
        return behaviour.base_version
    progress = 1.0 if end <= start else (run_s - start) / (end - start)
    return behaviour.rollout_version if progress >= rollout_at else behaviour.base_version


class WallClock:
    """RFC 3339 UTC timestamps with milliseconds, formatted cheaply (the date part is cached
    per second)."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now_iso(self, now: float | None = None) -> str:
        """``now`` (Unix seconds; default: the current time) as ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
        if now is None:
            now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"
