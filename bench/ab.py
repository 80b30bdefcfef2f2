"""``python -m bench.ab``: two servers side by side, wrk alternating between them.

    python -m bench.ab --b HEARTBEAT_LEAN_PATH=false [--a KEY=VALUE ...] [--rounds 3] [--seconds 10]
        [--flame NAME]

A and B are the service as ``make run`` starts it (2 gevent workers, embedded PostgreSQL), each
with its own environment overrides, running at the same time. Each round posts heartbeats with
wrk to A, then to B, then GET /healthz to A, then to B, so both see the same machine load within
seconds of each other; it prints each figure and the B/A ratios. On a shared machine only the
ratios mean anything. ``--flame NAME`` then runs the simulator at (c)'s rate against each server
in turn and writes a py-spy flame graph of one device-plane worker to
``bench/results/NAME-a.svg`` and ``NAME-b.svg``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.server import ROOT, BenchServer, enroll_devices, start
from bench.suite import ensure_wrk, run_wrk, start_py_spy
from db.embedded import EmbeddedCluster


def parse_env(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE pairs as a dict."""
    return dict(pair.split("=", 1) for pair in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab")
    parser.add_argument("--a", action="append", default=[], help="KEY=VALUE for server A (repeatable)")
    parser.add_argument("--b", action="append", default=[], help="KEY=VALUE for server B (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--devices", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--flame", default="", help="flame graphs during a simulator run: bench/results/NAME-a|b.svg")
    parser.add_argument("--flame-s", type=int, default=40, help="simulator run length (profiled: the middle half)")
    parser.add_argument("--flame-interval", type=float, default=4.0,
                        help="10,000 devices at this interval: 4 is (c)'s 2,500/s; more is gentler on a busy machine")
    args = parser.parse_args(argv)
    wrk = ensure_wrk()
    servers, tokens = {}, {}
    try:
        for name, pairs in (("A", args.a), ("B", args.b)):
            var_dir = ROOT / "var" / f"bench-ab-{name.lower()}"
            if var_dir.exists():
                EmbeddedCluster(var_dir / "pg").stop()
                shutil.rmtree(var_dir)
            env = {"DEDUP_BUCKET_SECONDS": "1", **parse_env(pairs)}
            print(f"ab: starting {name} with {env} ...", flush=True)
            servers[name] = server = start(var_dir, **env)
            devices = enroll_devices(server, args.devices, prefix=f"ab-{name}", batch=5000)
            tokens[name] = var_dir / "tokens.txt"
            tokens[name].write_text("\n".join(d["token"] for d in devices))
            # warm-up: every worker caches every token (keep-alive connections stay on one worker)
            for _ in range(3):
                run_wrk(wrk, server.url, "heartbeat.lua", 5, args.connections, tokens[name])
        rows = []
        for k in range(args.rounds):
            row = {}
            for script, path in (("heartbeat.lua", ""), ("trivial.lua", "/healthz")):
                for name in ("A", "B"):
                    out = run_wrk(wrk, servers[name].url + path, script, args.seconds, args.connections, tokens[name])
                    row[(script, name)] = out["rate_per_s"]
            hb_ratio = row[("heartbeat.lua", "B")] / row[("heartbeat.lua", "A")]
            a_share = row[("heartbeat.lua", "A")] / row[("trivial.lua", "A")]
            b_share = row[("heartbeat.lua", "B")] / row[("trivial.lua", "B")]
            rows.append((hb_ratio, a_share, b_share))
            print(f"round {k + 1}: heartbeat/s A {row[('heartbeat.lua', 'A')]:,.0f} "
                  f"B {row[('heartbeat.lua', 'B')]:,.0f} (B/A {hb_ratio:.2f}); "
                  f"/healthz/s A {row[('trivial.lua', 'A')]:,.0f} "
                  f"B {row[('trivial.lua', 'B')]:,.0f}; heartbeat/trivial A {a_share:.2f} B {b_share:.2f}",
                  flush=True)
            time.sleep(1)
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        print(f"median over {args.rounds} rounds: heartbeat B/A {med[0]:.2f}; heartbeat/trivial A {med[1]:.2f} "
              f"B {med[2]:.2f}")
        for name in ("A", "B") if args.flame else ():
            svg = ROOT / "bench" / "results" / f"{args.flame}-{name.lower()}.svg"
            print(f"ab: flame graph of {name} during a simulator run -> {svg.relative_to(ROOT)}", flush=True)
            print(profile_under_simulator(servers[name], args.flame_s, args.flame_interval, svg), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return 0


def profile_under_simulator(server: BenchServer, seconds: int, interval_s: float, svg: Path) -> str:
    """The simulator with 10,000 devices at ``interval_s`` (4: (c)'s rate) for ``seconds``, py-spy
    on one device-plane worker over the middle half; the simulator's summary lines."""
    cmd = [sys.executable, "-m", "simulator", "--devices", "10000", "--duration", str(seconds),
           "--interval", f"{interval_s:g}", "--jitter", f"{interval_s / 4:g}", "--ramp-up", "5", "--quiet",
           "--verify-sample", "200", f"--admin-key={server.admin_key}",
           "--url", server.url, "--admin-url", server.admin_url,
           "--token-cache", str(server.var_dir / "sim-tokens.json")]
    sim = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(5 + seconds / 4)
    spy = start_py_spy((server.workers("device") or server.workers())[0].pid, seconds / 2, svg)
    out, _ = sim.communicate(timeout=seconds + 300)
    if spy is not None:
        spy.wait(timeout=120)
    lines = [line for line in out.splitlines() if "p99" in line or "SLI" in line]
    return "\n".join(lines[-8:])


if __name__ == "__main__":
    sys.exit(main())
