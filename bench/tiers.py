"""Per-tier figures for docs/SCALING.md (the last part of ``make bench``).

One PostgreSQL (the embedded one, its own cluster in var/tiers) and two runs side by side at the
same total rate, so that the machine's noise hits both alike:

  A  one API node (one gunicorn worker), one simulator;
  B  two API nodes (one worker each, own var/), two simulators at half the rate each;
  C  as B with DB_PREPARED_STATEMENTS=false (what PgBouncer's transaction pooling needs).

Measured over the steady part of each run (after the ramp-up, before the end): heartbeats
stored per second, CPU of the API nodes and of PostgreSQL (process trees, user + system), so
API core-seconds and PostgreSQL CPU per heartbeat; WAL bytes per heartbeat
(pg_current_wal_lsn); table + index bytes per stored heartbeat row and per device_last_status
row; PostgreSQL connections held per node. Prints a table and writes bench/results/tiers-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.cluster import ROOT, ApiNode, Processes, free_port, start_api_node
from config.admin_key import new_key
from db.embedded import EmbeddedCluster
from db.migrate import upgrade

NODE_ENV = {"WEB_CONCURRENCY": "1", "DEDUP_BUCKET_SECONDS": "1", "DEVICE_MAX_PER_MINUTE": "100000",
            "SCHEDULER_ENABLED": "false"}


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes and their descendants."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def postmaster_pid(cluster: EmbeddedCluster) -> int:
    return int((cluster.data_dir / "postmaster.pid").read_text().split()[0])


def db_sample(cluster: EmbeddedCluster) -> dict[str, float]:
    """Rows stored, WAL position (bytes) and client connections of the API right now."""
    out = cluster.psql(
        "SELECT (SELECT count(*) FROM heartbeats), pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0'), "
        "(SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'nexmdm%' "
        "AND backend_type = 'client backend')", database="nexmdm")
    rows, wal, conns = out.split("|")
    return {"rows": int(rows), "wal_bytes": float(wal), "connections": int(conns)}


def storage_per_row(cluster: EmbeddedCluster) -> dict[str, float]:
    """Heap + index (+ TOAST) bytes per heartbeats row and per device_last_status row."""
    out = cluster.psql(
        "SELECT (SELECT sum(pg_total_relation_size(c.oid)) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "        JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'heartbeats'), "
        "(SELECT count(*) FROM heartbeats), pg_total_relation_size('device_last_status'), "
        "(SELECT count(*) FROM device_last_status)", database="nexmdm")
    hb_bytes, hb_rows, st_bytes, st_rows = (float(x) for x in out.split("|"))
    return {"heartbeat_row_bytes": hb_bytes / max(1, hb_rows), "last_status_row_bytes": st_bytes / max(1, st_rows),
            "heartbeat_rows": hb_rows, "last_status_rows": st_rows}


def run_phase(label: str, procs: Processes, nodes: list[ApiNode], cluster: EmbeddedCluster, admin_key: str,
              devices: int, interval_s: float, duration_s: float, base: Path) -> dict[str, Any]:
    """Simulators (one per node, the fleet split between them) and the figures of their steady part."""
    sims = []
    per_node = devices // len(nodes)
    for i, node in enumerate(nodes):
        cmd = [sys.executable, "-m", "simulator", "--devices", str(per_node), "--duration", str(duration_s),
               f"--admin-key={admin_key}", "--url", node.url, "--admin-url", node.admin_url,
               "--interval", str(interval_s),
               "--jitter", str(interval_s / 4), "--ramp-up", "5", "--progress-jsonl", "--quiet",
               "--verify-sample", "200", "--token-cache", str(base / f"tokens-{label}-{i}.json"),
               "--output", str(base / f"sim-{label}-{i}.json")]
        (base / f"sim-{label}-{i}.json").unlink(missing_ok=True)
        # Not through procs.start: its progress lines are read here. Registered for stop_all all the same.
        # The first simulator's progress lines time the window; the others' go to their log
        # (an unread pipe would fill and stall them).
        with (base / f"sim-{label}-{i}.log").open("w") as err:
            sim = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE if i == 0 else err, stderr=err, text=True)
        procs.entries.append((f"sim-{label}-{i}", sim))
        sims.append(sim)
    api_pids = [n.proc.pid for n in nodes]
    pg_pid = postmaster_pid(cluster)
    sim_pids = [s.pid for s in sims]
    start_at, end_at = 8.0, duration_s - 3.0  # after the ramp-up and the caches' warm-up; before the end
    marks: dict[str, dict[str, float]] = {}
    deadline = time.monotonic() + duration_s + 300
    for line in sims[0].stdout:  # the first simulator's clock times both (they start together)
        if time.monotonic() > deadline:
            break
        try:
            snap = json.loads(line)
        except ValueError:
            continue
        if snap.get("type") != "progress" or snap.get("phase") == "final":
            continue
        key = "start" if "start" not in marks and snap["t_s"] >= start_at else (
            "end" if "start" in marks and "end" not in marks and snap["t_s"] >= end_at else None)
        if key:
            marks[key] = {"t": time.monotonic(), "api_cpu": tree_cpu_s(api_pids), "pg_cpu": tree_cpu_s([pg_pid]),
                          "sim_cpu": tree_cpu_s(sim_pids), **db_sample(cluster)}
    reports = []
    for sim in sims:
        if sim.stdout:
            sim.stdout.close()
        sim.wait(timeout=300)
    for i, sim in enumerate(sims):
        out = base / f"sim-{label}-{i}.json"
        if not out.exists():
            raise RuntimeError(f"simulator {label}-{i} exited {sim.returncode} without a report: "
                               f"{(base / f'sim-{label}-{i}.log').read_text()[-2000:]}")
        reports.append(json.loads(out.read_text()))
    a, b = marks["start"], marks["end"]
    wall = b["t"] - a["t"]
    rows = b["rows"] - a["rows"]
    return {
        "label": label, "nodes": len(nodes), "devices": devices, "interval_s": interval_s,
        "window_s": round(wall, 1),
        "stored_per_s": round(rows / wall, 1),
        "api_cores": round((b["api_cpu"] - a["api_cpu"]) / wall, 3),
        "pg_cores": round((b["pg_cpu"] - a["pg_cpu"]) / wall, 3),
        "sim_cores": round((b["sim_cpu"] - a["sim_cpu"]) / wall, 3),
        "heartbeats_per_api_core_s": round(rows / max(1e-9, b["api_cpu"] - a["api_cpu"]), 0),
        "pg_cpu_us_per_heartbeat": round(1e6 * (b["pg_cpu"] - a["pg_cpu"]) / max(1, rows), 1),
        "api_cpu_us_per_heartbeat": round(1e6 * (b["api_cpu"] - a["api_cpu"]) / max(1, rows), 1),
        "wal_bytes_per_heartbeat": round((b["wal_bytes"] - a["wal_bytes"]) / max(1, rows), 0),
        "pg_connections": b["connections"],
        "pg_connections_per_node": round(b["connections"] / len(nodes), 1),
        "p95_ms": [r["latency_ms"]["heartbeat"]["p95"] for r in reports],
        "p99_ms": [r["latency_ms"]["heartbeat"]["p99"] for r in reports],
        "lost": sum(r["no_loss"]["lost"] for r in reports),
        "errors": sum(r["errors"]["total"] for r in reports),
    }


def archive_per_row(cluster: EmbeddedCluster, url: str, archive_dir: Path) -> dict[str, float]:
    """Export every heartbeats partition with rows through the nightly job's own exporter
    (``python -m scheduler export`` with ``ARCHIVE_FORMAT=parquet``, the default: the cold tier's
    Parquet file, zstd, read back against the partition, SHA-256); bytes per archived row."""
    names = [n for n in cluster.psql(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p "
        "ON p.oid = i.inhparent WHERE p.relname = 'heartbeats' AND c.reltuples <> 0 ORDER BY 1",
        database="nexmdm").split() if n]
    rows = int(cluster.psql("SELECT count(*) FROM heartbeats", database="nexmdm"))
    shutil.rmtree(archive_dir, ignore_errors=True)
    env = dict(os.environ, DATABASE_URL=url, ARCHIVE_DIR=str(archive_dir), ARCHIVE_FORMAT="parquet")
    subprocess.run([sys.executable, "-m", "scheduler", "export", *names], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    size = sum(f.stat().st_size for f in archive_dir.iterdir() if not f.name.endswith(".json"))
    return {"archive_bytes_per_row": size / max(1, rows), "archived_rows": rows}


def render(phases: list[dict[str, Any]], storage: dict[str, float]) -> str:
    keys = [("stored heartbeats/s", "stored_per_s"), ("API cores", "api_cores"), ("PostgreSQL cores", "pg_cores"),
            ("simulator cores", "sim_cores"), ("heartbeats/s per API core", "heartbeats_per_api_core_s"),
            ("API CPU per heartbeat (us)", "api_cpu_us_per_heartbeat"),
            ("PostgreSQL CPU per heartbeat (us)", "pg_cpu_us_per_heartbeat"),
            ("WAL bytes per heartbeat", "wal_bytes_per_heartbeat"),
            ("PostgreSQL connections (all nodes)", "pg_connections"),
            ("connections per node", "pg_connections_per_node"),
            ("heartbeat p95 (ms, per simulator)", "p95_ms"), ("heartbeat p99 (ms, per simulator)", "p99_ms"),
            ("lost / errors", None)]
    width = max(len(k) for k, _ in keys)
    head = f"{'':{width}}  " + "  ".join(f"{p['label']}: {p['nodes']} node(s)".ljust(24) for p in phases)
    lines = [head]
    for name, key in keys:
        cells = [f"{p['lost']} / {p['errors']}" if key is None else str(p[key]) for p in phases]
        lines.append(f"{name:{width}}  " + "  ".join(c.ljust(24) for c in cells))
    lines.append(f"storage: {storage['heartbeat_row_bytes']:.0f} bytes per heartbeats row (heap + indexes, "
                 f"{storage['heartbeat_rows']:.0f} rows); {storage['last_status_row_bytes']:.0f} bytes per "
                 f"device_last_status row ({storage['last_status_rows']:.0f} devices); "
                 f"{storage['archive_bytes_per_row']:.1f} bytes per heartbeat in the nightly job's archive file "
                 "(Parquet)")
    lines.append("A: one node; B: two nodes, the same total rate; C: as B without prepared statements "
                 "(DB_PREPARED_STATEMENTS=false, as behind PgBouncer in transaction mode)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tiers", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4000, help="devices in all (4,000 at --interval 4: 1,000/s)")
    parser.add_argument("--interval", type=float, default=4.0)
    parser.add_argument("--duration", type=float, default=45.0, help="seconds per run (45)")
    parser.add_argument("--dir", type=Path, default=ROOT / "var" / "tiers")
    args = parser.parse_args(argv)
    base = args.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    procs = Processes(base / "logs")
    cluster = EmbeddedCluster(base / "pg")
    admin_key = new_key()
    try:
        url = cluster.start()
        procs.extra_stops.append(cluster.stop)
        cluster.recreate_database()
        upgrade(url)
        env = dict(NODE_ENV, DATABASE_URL=url, ADMIN_KEY=admin_key)
        nodes = [ApiNode(f"node{i}", free_port(), base / f"node{i}", env) for i in (1, 2)]
        for node in nodes:
            start_api_node(procs, node)
        unprepared = [ApiNode(f"node{i}u", free_port(), base / f"node{i}u", dict(env, DB_PREPARED_STATEMENTS="false"))
                      for i in (1, 2)]
        print(f"tiers: PostgreSQL {url.rsplit('@', 1)[1]}, nodes {[n.url for n in nodes]}; "
              f"{args.devices} devices at --interval {args.interval:g} for {args.duration:g} s per run", flush=True)
        phases = [
            run_phase("A", procs, nodes[:1], cluster, admin_key, args.devices, args.interval, args.duration, base),
            run_phase("B", procs, nodes, cluster, admin_key, args.devices, args.interval, args.duration, base),
        ]
        for node in nodes:
            procs.stop(node.proc)
        for node in unprepared:
            start_api_node(procs, node)
        phases.append(
            run_phase("C", procs, unprepared, cluster, admin_key, args.devices, args.interval, args.duration, base))
        cluster.psql("ANALYZE heartbeats", database="nexmdm")
        storage = storage_per_row(cluster)
        storage.update(archive_per_row(cluster, url, base / "archive"))
    finally:
        procs.stop_all()
    print(render(phases, storage))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    out = ROOT / "bench" / "results" / f"tiers-{stamp}.json"
    out.write_text(json.dumps({"machine": {"cores": os.cpu_count()}, "phases": phases, "storage": storage,
                               "devices": args.devices, "interval_s": args.interval, "duration_s": args.duration},
                              indent=1))
    print(f"tiers: written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
