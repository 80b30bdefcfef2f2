"""``make bench-ingest``: the service as ``make run`` starts it, 100,000 devices enrolled (timed),
then 20 s of concurrent keep-alive heartbeat posts for 10,000 of them by wrk (the load
generator of ``make bench`` (a)); prints heartbeats/s, p50/p95/p99 and the CPU share of server
and database."""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.server import ROOT, enroll_devices, start
from bench.suite import ensure_wrk, run_wrk, stored_heartbeats
from db.embedded import EmbeddedCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest")
    parser.add_argument("--enroll", type=int, default=100_000, help="devices enrolled (timed), in batches")
    parser.add_argument("--devices", type=int, default=10_000, help="of which this many post heartbeats")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    wrk = ensure_wrk()
    var_dir = ROOT / "var" / "bench"
    print(f"bench-ingest: starting the service (embedded PostgreSQL in {var_dir}) ...", flush=True)
    # wrk walks the devices in order and sends sent_at = now: with 10,000 devices a device comes
    # round every few seconds, so the dedup bucket must be shorter or most sends are duplicates.
    server = start(var_dir, workers=args.workers, DEDUP_BUCKET_SECONDS="1")
    try:
        started = time.perf_counter()
        devices = enroll_devices(server, max(args.enroll, args.devices), prefix=f"bench-{int(time.time())}",
                                 batch=10_000)[: args.devices]
        enroll_s = time.perf_counter() - started
        tokens = var_dir / "tokens.txt"
        tokens.write_text("\n".join(d["token"] for d in devices))
        print(f"bench-ingest: wrk, {args.concurrency} keep-alive connections for {args.duration} s ...", flush=True)
        cluster = EmbeddedCluster(var_dir / "pg")
        stored_before = stored_heartbeats(cluster)
        cpu_before = server.cpu_seconds()
        wall_before = time.monotonic()
        result = run_wrk(wrk, server.url, "heartbeat.lua", args.duration, args.concurrency, tokens)
        wall = time.monotonic() - wall_before
        cpu_after = server.cpu_seconds()
        result["stored"] = stored_heartbeats(cluster) - stored_before
        result["stored_per_s"] = result["stored"] / wall
    finally:
        server.stop()
    cpu = {role: (cpu_after[role] - cpu_before[role]) / wall for role in cpu_after}
    print()
    print(f"  devices enrolled      {max(args.enroll, args.devices):>10,}   in {enroll_s:.1f} s"
          f" (batches of 10,000; target 100,000 in < 60 s)")
    print(f"  heartbeats stored/s   {result['stored_per_s']:>10,.0f}   ({result['stored']:,} stored of "
          f"{result['requests']:,.0f} answered, {result['errors']:,.0f} errors, in {wall:.1f} s)")
    print(f"  latency p50/p95/p99   {result['p50_ms']:>7.1f} / {result['p95_ms']:.1f} / {result['p99_ms']:.1f} ms"
          f"   (max {result['max_ms']:.1f} ms)")
    print(f"  CPU (cores busy)      API {cpu['api']:.2f}   PostgreSQL {cpu['db']:.2f}   of 2 cores")
    ok = result["stored_per_s"] >= 1000 and result["p99_ms"] < 100
    print(f"  target ≥1,000/s with p99 < 100 ms: {'MET' if ok else 'NOT MET'}")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "ingest.json").write_text(json.dumps(
        {"enrolled": max(args.enroll, args.devices), "devices": args.devices,
         "enroll_s": round(enroll_s, 2), "load": result,
         "cpu_cores": {k: round(v, 3) for k, v in cpu.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
