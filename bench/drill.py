"""``make drill-cluster``: the multi-node drill on one machine, with real processes.

Starts etcd, PostgreSQL under Patroni (primary, synchronous standby, asynchronous replica), three
API nodes (``python -m api serve``, each its own var/ and port, DATABASE_URL the libpq multi-host
URL with target_session_attrs=read-write) and HAProxy on the shipped config/haproxy/haproxy.cfg.
Then the simulator sends heartbeats through HAProxy while the drill SIGKILLs an API node, restarts
it, and SIGKILLs the primary (its Patroni agent and PostgreSQL, as a machine loss). The API
nodes read operator queries from the asynchronous replica (READ_DATABASE_URL). Each phase is
one simulator run with its own no-loss check; the drill prints

    scenario | sent | acknowledged | lost | duplicates stored | seconds to recover

and checks across nodes: a revocation refused on every node within the sync interval, and the
(every-minute, for the drill) partitions job run once per minute although three nodes schedule it.
Everything binds 127.0.0.1; every process it starts is stopped by PID, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.cluster import (
    ONE_SOURCE_FLEET,
    ROOT,
    ApiNode,
    ClusterError,
    Haproxy,
    PatroniCluster,
    Processes,
    free_port,
    start_api_node,
    start_etcd,
    start_haproxy,
    start_patroni_cluster,
    wait_for,
)

# The simulator compresses time (a heartbeat every 2 s per device): the dedup bucket must be
# shorter than interval - jitter, and the per-device rate limit (where present) higher.
NODE_ENV = {
    "WEB_CONCURRENCY": "1",
    "DB_POOL_SIZE": "10",
    "DB_MAX_OVERFLOW": "10",
    "DEDUP_BUCKET_SECONDS": "1",
    "DEVICE_MAX_PER_MINUTE": "100000",
    "TOKEN_SYNC_INTERVAL_S": "1",
    "PARTITIONS_CRON": "* * * * *",
}


@dataclass
class Row:
    """One line of the drill table."""

    scenario: str
    sent: int
    acknowledged: int
    lost: int
    duplicates: int
    recover_s: float | None
    note: str = ""


def render(rows: list[Row]) -> str:
    """The drill table as fixed-width text."""
    header = ("scenario", "sent", "acknowledged", "lost", "duplicates stored", "seconds to recover", "note")
    lines = [(r.scenario, f"{r.sent:,}", f"{r.acknowledged:,}", str(r.lost), str(r.duplicates),
              "-" if r.recover_s is None else f"{r.recover_s:.1f}", r.note) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), "-+-".join("-" * w for w in widths), *(fmt.format(*x) for x in lines)])


def call(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None,
         timeout_s: float = 5.0) -> tuple[int, Any]:
    """One HTTP call with a JSON body; (status, decoded answer); status 0 when nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except OSError:
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def heartbeat_body(sent_at: datetime) -> dict[str, Any]:
    return {"sent_at": sent_at.isoformat(), "battery_pct": 80, "charging": False, "network_type": "wifi",
            "signal_dbm": -60, "app_version": "1.0.0", "os_version": "14", "uptime_s": 1, "free_storage_mb": 100}


class Prober:
    """Posts a heartbeat of one probe device through HAProxy every 100 ms and remembers when
    each was acknowledged: the service's view of 'writes work again' after a fault."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url + "/v1/heartbeat"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.results: list[tuple[float, int]] = []  # (monotonic time answered, status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.is_set():
            status, _ = call(self.url, "POST", heartbeat_body(datetime.now(UTC)), self.headers, timeout_s=3)
            self.results.append((time.monotonic(), status))
            self._stop.wait(0.1)

    def recovered_after(self, t: float) -> float | None:
        """Seconds from ``t`` until writes work again: the first acknowledgement after the first
        failure following ``t`` (0 when nothing failed; None when nothing was acknowledged)."""
        after = [(ts, st) for ts, st in self.results if ts >= t]
        failures = [ts for ts, st in after if st != 200]
        if not failures:
            return 0.0
        ok = [ts for ts, st in after if st == 200 and ts > failures[0]]
        return ok[0] - t if ok else None

    def last_failure_after(self, t: float) -> float | None:
        """Seconds from ``t`` to the probe's last failure (shedding after the outage included)."""
        failures = [ts for ts, st in self.results if ts >= t and st != 200]
        return failures[-1] - t if failures else None

    def failures_after(self, t: float) -> int:
        return sum(1 for ts, st in self.results if ts >= t and st != 200)


class Drill:
    """The drill's processes and the phases it runs against them."""

    def __init__(self, base: Path, devices: int, nodes: int = 3) -> None:
        self.base = base
        self.devices = devices
        self.procs = Processes(base / "logs")
        self.admin_key = secrets.token_urlsafe(24)
        self.cluster: PatroniCluster | None = None
        self.api: list[ApiNode] = []
        self.haproxy: Haproxy | None = None
        self.n_nodes = nodes
        self.rows: list[Row] = []
        self.checks: list[str] = []

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        t0 = time.monotonic()
        etcd = start_etcd(self.procs, self.base)
        self.cluster = start_patroni_cluster(self.procs, self.base, etcd)
        roles = {m["name"]: m["role"] for m in self.cluster.members()}
        print(f"drill: etcd + Patroni up in {time.monotonic() - t0:.1f} s: {roles}", flush=True)
        env = dict(NODE_ENV, DATABASE_URL=self.cluster.app_url, ADMIN_KEY=self.admin_key)
        replica = next((n for n in self.cluster.nodes if n.tags.get("nosync")), None)
        if replica is not None:  # operator reads from the asynchronous replica while it is fresh
            env["READ_DATABASE_URL"] = self.cluster.url_of(replica)
        for i in range(1, self.n_nodes + 1):
            node = ApiNode(f"api{i}", free_port(), self.base / f"api{i}", env)
            # The first node migrates the schema; the others start after it, on a migrated schema.
            start_api_node(self.procs, node)
            self.api.append(node)
        self.haproxy = start_haproxy(self.procs, self.base, self.api, env_overrides=ONE_SOURCE_FLEET)
        print(f"drill: {len(self.api)} API nodes and HAProxy up after {time.monotonic() - t0:.1f} s "
              f"(edge {self.haproxy.url}, operator {self.haproxy.operator_url})", flush=True)

    def stop(self) -> None:
        self.procs.stop_all()

    @property
    def admin(self) -> dict[str, str]:
        return {"x-admin": self.admin_key}

    def enroll(self, uid: str) -> tuple[int, str]:
        status, body = call(self.haproxy.operator_url + "/v1/devices/enroll", "POST", {"device_uid": uid}, self.admin)
        if status not in (200, 201):
            raise ClusterError(f"enrolling {uid}: {status} {body}")
        device = body["devices"][0] if "devices" in body else body
        return device["id"], device["token"]

    # ------------------------------------------------------------------ load
    def simulate(self, name: str, duration_s: float, fault_at_s: float, fault: Callable[[], dict[str, Any]],
                 interval_s: float = 2.0) -> tuple[dict[str, Any], dict[str, Any]]:
        """One simulator run through HAProxy with ``fault`` run at ``fault_at_s``; (report, fault info)."""
        out = self.base / f"sim-{name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "simulator", "--devices", str(self.devices), "--duration", str(duration_s),
               f"--admin-key={self.admin_key}", "--url", self.haproxy.url, "--admin-url", self.haproxy.operator_url,
               "--interval", str(interval_s), "--jitter", str(interval_s / 4), "--ramp-up", "2",
               "--max-retries", "40", "--timeout", "10", "--connections", "256",
               "--token-cache", str(self.base / "tokens.json"), "--output", str(out), "--quiet"]
        sim = self.procs.start(f"simulator-{name}", cmd)
        started = time.monotonic()
        info: dict[str, Any] = {}
        try:
            # Enrollment and the server check come first: the load starts when the report's
            # clock does, so the fault is timed from the simulator's first progress.
            time.sleep(max(0.0, fault_at_s - (time.monotonic() - started)))
            if sim.poll() is None:
                info = fault()
            sim.wait(timeout=duration_s + 180)
        except subprocess.TimeoutExpired:
            tail = self.procs.log_tail(f"simulator-{name}")
            raise ClusterError(f"simulator {name} did not finish in time: {tail}") from None
        finally:
            if sim.poll() is None:
                self.procs.stop(sim)
        if not out.exists():
            raise ClusterError(f"simulator {name} wrote no report: {self.procs.log_tail('simulator-' + name)}")
        return json.loads(out.read_text()), info

    def record(self, scenario: str, report: dict[str, Any], recover_s: float | None, note: str) -> None:
        tp, nl = report["throughput"], report["no_loss"]
        kinds = report["errors"]["by_kind"]
        if kinds:
            note += " (" + ", ".join(f"{k.split(':', 1)[-1]}: {n}" for k, n in sorted(kinds.items())) + ")"
        if nl.get("errors"):
            note += f"; {nl['errors']} history reads failed in the no-loss check"
        self.rows.append(Row(scenario, tp["sent"], tp["acknowledged"], nl["lost"], nl["duplicates_stored"],
                             recover_s, note))
        print(f"drill: {scenario}: sent {tp['sent']:,}, acknowledged {tp['acknowledged']:,}, lost {nl['lost']}, "
              f"duplicates stored {nl['duplicates_stored']}, errors {report['errors']['total']}", flush=True)

    # ------------------------------------------------------------------ scenarios
    def api_node_kill_and_restart(self, phase_s: float, prober: Prober) -> None:
        victim = self.api[1]
        marks: dict[str, float] = {}

        def kill() -> dict[str, Any]:
            marks["t"] = time.monotonic()
            self.procs.kill(victim.proc)
            down = wait_for(f"HAProxy marks {victim.name} DOWN",
                            lambda: self.haproxy.server_states()[victim.name].startswith("DOWN"), 30, 0.05)
            marks["down"] = time.monotonic()
            return {"down": down}

        report, _ = self.simulate("api-kill", phase_s, phase_s / 3, kill)
        out_s = marks["down"] - marks["t"]
        probe_fail = prober.failures_after(marks["t"])
        self.record(f"API node SIGKILL ({victim.name})", report, out_s,
                    f"out of rotation after {out_s:.1f} s; probe failures {probe_fail}; "
                    f"errors seen by devices {report['errors']['total']}")

        def restart() -> dict[str, Any]:
            marks["restart"] = time.monotonic()
            start_api_node(self.procs, victim)
            wait_for(f"HAProxy marks {victim.name} UP",
                     lambda: self.haproxy.server_states()[victim.name] == "UP", 30, 0.05)
            marks["up"] = time.monotonic()
            return {}

        report, _ = self.simulate("api-restart", phase_s, phase_s / 3, restart)
        up_s = marks["up"] - marks["restart"]
        self.record(f"API node restart ({victim.name})", report, up_s,
                    f"serving again {up_s:.1f} s after its restart; errors seen by devices {report['errors']['total']}")

    def primary_kill(self, phase_s: float, prober: Prober) -> None:
        cluster = self.cluster
        old = cluster.leader()
        standby = cluster.sync_standby()
        marks: dict[str, Any] = {}

        def kill() -> dict[str, Any]:
            marks["t"] = time.monotonic()
            cluster.kill_node(old)
            new = wait_for("a new primary", lambda: (lead := cluster.leader()) and lead is not old and lead, 60, 0.1)
            marks["promoted"] = time.monotonic()
            marks["new"] = new
            return {}

        report, _ = self.simulate("primary-kill", phase_s, phase_s / 3, kill)
        recover = prober.recovered_after(marks["t"])
        new = marks["new"]
        promoted_s = marks["promoted"] - marks["t"]
        last = prober.last_failure_after(marks["t"])
        note = (f"{old.name} killed; {new.name} promoted after {promoted_s:.1f} s "
                f"({'the' if new is standby else 'NOT the'} synchronous standby); probe failures "
                f"{prober.failures_after(marks['t'])}, the last {last or 0:.1f} s after the kill")
        self.record(f"primary PostgreSQL SIGKILL ({old.name})", report, recover, note)
        if new is not standby:
            raise ClusterError(f"Patroni promoted {new.name}, not the synchronous standby {standby.name}")
        # The old primary's machine comes back: Patroni rewinds it and it rejoins as standby.
        t = time.monotonic()
        cluster.start_node(old)
        wait_for(f"{old.name} back as synchronous standby", lambda: cluster.sync_standby() is old, 120, 0.25)
        self.checks.append(f"{old.name} rejoined as the synchronous standby {time.monotonic() - t:.1f} s after its "
                           f"Patroni restarted (pg_rewind); until then {new.name} committed without a synchronous "
                           f"standby (synchronous_mode_strict off)")

    def revocation_reaches_every_node(self) -> None:
        device_id, token = self.enroll(f"drill-revoke-{secrets.token_hex(4)}")
        headers = {"Authorization": f"Bearer {token}"}
        for node in self.api:  # every node has the token in its cache
            status, body = call(node.url + "/v1/heartbeat", "POST", heartbeat_body(datetime.now(UTC)), headers)
            if status != 200:
                raise ClusterError(f"{node.name}: heartbeat answered {status} {body}")
        t = time.monotonic()
        status, body = call(f"{self.api[0].admin_url}/v1/devices/{device_id}/revoke", "POST", None, self.admin)
        if status != 200:
            raise ClusterError(f"revoke answered {status} {body}")
        refused: dict[str, float] = {}
        deadline = t + 10
        n = 0
        while len(refused) < len(self.api) and time.monotonic() < deadline:
            n += 1
            for node in self.api:
                if node.name in refused:
                    continue
                sent_at = datetime.now(UTC) + timedelta(seconds=n % 60)
                status, _ = call(node.url + "/v1/heartbeat", "POST", heartbeat_body(sent_at), headers)
                if status == 401:
                    refused[node.name] = time.monotonic() - t
            time.sleep(0.05)
        worst = max(refused.values(), default=float("inf"))
        line = (f"revocation on {self.api[0].name}: refused on {len(refused)}/{len(self.api)} nodes, the last after "
                f"{worst:.2f} s (TOKEN_SYNC_INTERVAL_S = 1)")
        self.checks.append(line)
        if len(refused) < len(self.api) or worst > 2.5:
            raise ClusterError(line)

    def operator_reads_from_replica(self) -> None:
        """Operator reads through HAProxy's operator frontend say where they were answered."""
        sources: dict[str, int] = {}
        for _ in range(20):
            status, body = call(self.haproxy.operator_url + "/v1/fleet/summary", headers=self.admin)
            if status != 200:
                raise ClusterError(f"fleet summary answered {status} {body}")
            sources[body.get("source", "?")] = sources.get(body.get("source", "?"), 0) + 1
            time.sleep(0.05)
        line = f"operator reads (fleet summary x20 through HAProxy): answered by {sources}"
        self.checks.append(line)

    def jobs_run_once(self) -> None:
        """Every node fires the partitions job each minute (PARTITIONS_CRON); its period is the
        hour, so each hour must show exactly one succeeded run and the other firings skipped."""
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        from db.engine import sqlalchemy_url
        from db.job_runs import runs_per_period

        engine = create_engine(sqlalchemy_url(self.cluster.url_of(self.cluster.leader())), poolclass=NullPool)
        try:
            with engine.connect() as conn:
                periods = runs_per_period(conn, "partitions", "schedule")
        finally:
            engine.dispose()
        succeeded = [ok for _, ok, _, _ in periods]
        skipped = sum(s for _, _, s, _ in periods)
        minutes = sum(m for _, _, _, m in periods)
        line = (f"partitions job fired every minute by {len(self.api)} nodes for {minutes} minutes: "
                f"succeeded runs per hourly period {succeeded}, {skipped} firings skipped")
        self.checks.append(line)
        if minutes < 2 or any(ok != 1 for ok in succeeded):
            raise ClusterError(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drill", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=400, help="simulated devices (400: 200 heartbeats/s)")
    parser.add_argument("--phase-s", type=float, default=30.0, help="seconds of load per scenario (30)")
    parser.add_argument("--dir", type=Path, default=ROOT / "var" / "drill", help="working directory (var/drill)")
    args = parser.parse_args(argv)
    drill = Drill(args.dir.resolve(), args.devices)

    def _interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupted)
    failed: BaseException | None = None
    t0 = time.monotonic()
    print(f"drill: load average before the start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(other work on this machine shows in the latencies, not in what is lost)", flush=True)
    try:
        drill.start()
        _, token = drill.enroll("drill-probe")
        prober = Prober(drill.haproxy.url, token)
        prober.start()
        try:
            drill.api_node_kill_and_restart(args.phase_s, prober)
            drill.primary_kill(args.phase_s + 10, prober)
        finally:
            prober.stop()
        drill.revocation_reaches_every_node()
        drill.operator_reads_from_replica()
        drill.jobs_run_once()
    except (Exception, KeyboardInterrupt) as exc:
        failed = exc
    finally:
        print(f"drill: stopping every process it started ({len(drill.procs.entries)})", flush=True)
        drill.stop()
    if drill.rows:
        print()
        print(render(drill.rows))
        print("sent: heartbeat requests (retries included); lost and duplicates stored: the simulator's read-back "
              "of every acknowledged heartbeat after the phase; recover: API kill = until HAProxy took the node "
              "out, restart = until it served again, primary = until a probe heartbeat (every 100 ms through "
              "HAProxy) was acknowledged again after the outage began")
    for line in drill.checks:
        print(f"check: {line}")
    print(f"drill: {time.monotonic() - t0:.0f} s in all; load average now {os.getloadavg()[0]:.1f}")
    bad = [r for r in drill.rows if r.lost or r.duplicates]
    if failed is not None:
        print(f"drill FAILED: {failed}", file=sys.stderr)
        return 1
    if bad:
        print("drill FAILED: acknowledged heartbeats lost or stored twice", file=sys.stderr)
        return 1
    print("drill PASSED: nothing acknowledged lost, nothing stored twice")
    return 0


if __name__ == "__main__":
    sys.exit(main())
