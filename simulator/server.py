"""Everything that talks to the server's operator API: checks, enrollment with its token
cache, the end-of-run no-loss check, pool figures. Usage, connection and authentication
problems raise UsageError (exit code 2)."""

from __future__ import annotations

import json
import random
import time
from array import array
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import gevent
import msgspec

from config.settings import PROJECT_ROOT
from simulator.transport import TransportError, connect, split_url


class UsageError(Exception):
    """A configuration, connection or authentication problem: exit code 2."""


def split_or_usage(url: str) -> tuple[str, int, str]:
    """split_url, with a usage error for a bad URL."""
    try:
        return split_url(url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class AdminApi:
    """Small blocking-style (gevent) JSON client for the operator endpoints."""

    def __init__(self, url: str, admin_key: str, timeout_s: float = 30.0) -> None:
        self.url = url
        self._admin_key = admin_key
        self._timeout_s = timeout_s
        self._conn = connect("raw", url, timeout_s)
        self._headers = f"x-admin: {admin_key}\r\nAccept: application/json\r\n".encode()

    def clone(self) -> AdminApi:
        """Another client on its own connection (for concurrent use)."""
        return AdminApi(self.url, self._admin_key, self._timeout_s)

    def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """(status, decoded JSON body); UsageError when the server cannot be reached."""
        body = None if payload is None else msgspec.json.encode(payload)
        try:
            answer = self._conn.request(method.encode(), path.encode(), self._headers, body)
        except TransportError as exc:
            raise UsageError(f"cannot reach the server at {self.url}: {exc}") from None
        try:
            data = msgspec.json.decode(answer.body) if answer.body else None
        except msgspec.DecodeError:
            data = answer.body[:200].decode(errors="replace")
        return answer.status, data

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def check_server(api: AdminApi, device_url: str | None = None) -> dict[str, Any]:
    """Both planes answer and the admin key works; UsageError (exit 2) otherwise. ``api``
    talks to the operator plane; ``device_url`` is the device plane (None: the same server)."""
    planes = [api]
    if device_url and device_url != api.url:
        planes.insert(0, AdminApi(device_url, "", timeout_s=10))
    try:
        for plane in planes:
            status, body = plane.call("GET", "/healthz")
            if status != 200:
                raise UsageError(f"{plane.url}/healthz answered {status}: {body}")
            status, body = plane.call("GET", "/readyz")
            if status != 200:
                raise UsageError(f"{plane.url}/readyz answered {status}: the server cannot reach its database ({body})")
    finally:
        if planes[0] is not api:
            planes[0].close()
    status, body = api.call("GET", "/v1/devices?limit=1")
    if status in (401, 403):
        raise UsageError(f"the admin key was refused ({status}): {body}")
    if status == 404 and isinstance(body, dict) and body.get("error") == "wrong_plane":
        raise UsageError(f"{api.url} is not the operator plane (give it as --admin-url): {body.get('detail')}")
    if status != 200:
        raise UsageError(f"GET /v1/devices answered {status}: {body}")
    return {"healthz": "ok", "readyz": "ok", "admin_key": "ok"}


class ProgressBar:
    """A one-line progress bar on a terminal stream (a plain line per 10 % elsewhere)."""

    def __init__(self, label: str, total: int, stream: TextIO, enabled: bool = True) -> None:
        self.label, self.total, self.stream, self.enabled = label, total, stream, enabled
        self.started = time.monotonic()
        self._last_decile = -1
        self._tty = stream.isatty()

    def update(self, done: int) -> None:
        """Show ``done`` of ``total``."""
        if not self.enabled or not self.total:
            return
        frac = min(1.0, done / self.total)
        elapsed = time.monotonic() - self.started
        if self._tty:
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {done:,}/{self.total:,} {elapsed:5.1f} s")
            if done >= self.total:
                self.stream.write("\n")
        elif int(frac * 10) != self._last_decile:
            self._last_decile = int(frac * 10)
            self.stream.write(f"{self.label}: {done:,}/{self.total:,} ({frac:.0%}, {elapsed:.1f} s)\n")
        self.stream.flush()


@dataclass
class EnrolledDevice:
    device_id: int
    device_uid: str
    token: str


def default_token_cache(url: str) -> Path:
    """var/simulator/tokens-HOST-PORT.json: one cache per server."""
    host, port, _ = split_url(url)
    return PROJECT_ROOT / "var" / "simulator" / f"tokens-{host}-{port}.json"


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("devices"), list) and data.get("fleet_id"):
            return data
    except (OSError, ValueError):
        pass
    return {"fleet_id": f"{random.getrandbits(40):010x}", "devices": []}


def _save_cache(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.chmod(0o600)  # bearer tokens of the simulated fleet
    tmp.replace(path)


def _cache_is_current(api: AdminApi, devices: list[list[Any]]) -> bool:
    """The server still knows the cached devices (a reset database makes the cache stale)."""
    sample = devices[:1] + devices[-1:] + random.Random(0).sample(devices, min(3, len(devices)))
    for device_id, uid, _ in sample:
        status, body = api.call("GET", f"/v1/devices/{device_id}")
        if status != 200 or not isinstance(body, dict) or body.get("device_uid") != uid or body.get("revoked_at"):
            return False
    return True


def enroll_fleet(api: AdminApi, n: int, cache_path: Path, batch: int, stream: TextIO,
                 show_progress: bool = True) -> list[EnrolledDevice]:
    """``n`` enrolled devices: reused from the token cache, the rest enrolled in batches."""
    cache = _load_cache(cache_path)
    if cache["devices"] and not _cache_is_current(api, cache["devices"]):
        stream.write(f"token cache {cache_path} is stale (the server does not know its devices); re-enrolling\n")
        cache = {"fleet_id": f"{random.getrandbits(40):010x}", "devices": []}
    have = len(cache["devices"])
    if have < n:
        bar = ProgressBar("enrolling", n - have, stream, show_progress)
        done = 0
        fleet_id = cache["fleet_id"]
        while have + done < n:
            start = have + done
            size = min(batch, n - start)
            devices = [
                {"device_uid": f"sim-{fleet_id}-{i}", "name": f"simulated {i}",
                 "labels": ["simulator", f"fleet:{fleet_id}"]}
                for i in range(start, start + size)
            ]
            status, body = api.call("POST", "/v1/devices/enroll", {"devices": devices})
            if status != 201:
                _save_cache(cache_path, cache)
                raise UsageError(f"enrollment failed ({status}): {body}")
            cache["devices"].extend([d["id"], d["device_uid"], d["token"]] for d in body["devices"])
            done += size
            bar.update(done)
        _save_cache(cache_path, cache)
    elif show_progress:
        stream.write(f"reusing {n:,} enrolled devices from {cache_path}\n")
    return [EnrolledDevice(i, u, t) for i, u, t in cache["devices"][:n]]


def verify_no_loss(api: AdminApi, acked: dict[int, array], sample: int, stream: TextIO,
                   show_progress: bool = True, concurrency: int = 16) -> dict[str, Any]:
    """Ask the server what it stored for the run's devices and compare with every acknowledged
    bucket. ``lost``: acknowledged but not stored. ``duplicates_stored``: one sent heartbeat
    (device, sent_at) stored in more than one row."""
    device_ids = sorted(acked)
    sampled = bool(sample) and sample < len(device_ids)
    if sampled:
        device_ids = sorted(random.Random(7).sample(device_ids, sample))
    result = {"devices_checked": len(device_ids), "sampled": sampled, "acknowledged_buckets": 0,
              "stored_rows": 0, "lost": 0, "duplicates_stored": 0, "stored_unacknowledged": 0,
              "lost_examples": [], "errors": 0}
    bar = ProgressBar("checking stored heartbeats", len(device_ids), stream, show_progress)
    done = [0]
    queue = list(device_ids)

    def check(client: AdminApi) -> None:
        while queue:
            device_id = queue.pop()
            buckets = set(acked[device_id])
            since = datetime.fromtimestamp(min(buckets), UTC).isoformat()
            until_ts = max(buckets) + 1
            stored: set[int] = set()
            sent_ats: dict[str, int] = {}
            while True:
                until = datetime.fromtimestamp(until_ts, UTC).isoformat()
                # From the primary: a read replica (up to READ_MAX_LAG_S behind) may lack the
                # newest acknowledged heartbeats, which would count as lost.
                path = f"/v1/devices/{device_id}/heartbeats?since={since}&until={until}&limit=10000&source=primary"
                try:
                    status, body = client.call("GET", path.replace("+00:00", "Z"))
                except UsageError:  # one failed read: counted, and the loss SLI then fails
                    status, body = 0, None
                if status != 200:
                    result["errors"] += 1
                    break
                rows = body["heartbeats"]
                for row in rows:
                    stored.add(int(datetime.fromisoformat(row["bucket_ts"]).timestamp()))
                    sent_ats[row["sent_at"]] = sent_ats.get(row["sent_at"], 0) + 1
                if len(rows) < 10000:
                    break
                until_ts = min(int(datetime.fromisoformat(r["bucket_ts"]).timestamp()) for r in rows)
            missing = buckets - stored
            result["acknowledged_buckets"] += len(buckets)
            result["stored_rows"] += len(stored)
            result["lost"] += len(missing)
            result["stored_unacknowledged"] += len(stored - buckets)
            result["duplicates_stored"] += sum(n - 1 for n in sent_ats.values() if n > 1)
            if missing and len(result["lost_examples"]) < 10:
                result["lost_examples"].append({"device_id": device_id, "bucket_ts": sorted(missing)[:3]})
            done[0] += 1
            bar.update(done[0])

    clients = [api.clone() for _ in range(min(concurrency, max(1, len(device_ids))))]
    try:
        gevent.joinall([gevent.spawn(check, c) for c in clients], raise_error=True)
    finally:
        for c in clients:
            c.close()
    return result
