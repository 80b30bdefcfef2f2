"""``make bench``: the performance suite of issue 7, in one go on this machine.

a. saturation: wrk (C, from Debian) posts real heartbeats for 20,000 enrolled devices (after a
   warm-up that fills every worker's token cache, as a fleet in steady state does);
b. the same wrk against GET /healthz of the same server: heartbeat/trivial ratio;
c. the simulator at the rate of 150,000 devices at 60 s (10,000 devices at --interval 4);
d. device-status and fleet-summary reads during (c), over 150,000+ enrolled devices.

Prints a table and writes bench/results/bench-<time>.json (and latest.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench.server import ROOT, BenchServer, enroll_devices, start
from db.embedded import EmbeddedCluster

RESULT_RE = re.compile(r"NEXMDM_RESULT (.*)")


def ensure_wrk() -> str:
    """The wrk binary, installed from Debian's packages when missing (as root)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: installing wrk (apt-get) ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, capture_output=True)
        found = shutil.which("wrk")
    if not found:
        raise SystemExit("bench: wrk is needed (apt-get install wrk)")
    return found


def run_wrk(wrk: str, url: str, script: str, seconds: int, connections: int, tokens: Path) -> dict[str, float]:
    """One wrk run; returns requests/s and latency percentiles in ms."""
    out = subprocess.run(
        [wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(ROOT / "bench" / script), url],
        env=dict(os.environ, NEXMDM_TOKENS=str(tokens)), capture_output=True, text=True, check=True,
        timeout=seconds + 60,
    )
    match = RESULT_RE.search(out.stdout)
    if not match:
        raise RuntimeError(f"wrk printed no result: {out.stdout}\n{out.stderr}")
    fields = dict(kv.split("=") for kv in match.group(1).split())
    values = {k: float(v) for k, v in fields.items()}
    duration_s = values["duration_us"] / 1e6
    return {
        "requests": values["requests"],
        "rate_per_s": values["requests"] / duration_s,
        "errors": values["errors"] + values["status_errors"],
        **{k.replace("_us", "_ms"): values[k] / 1000 for k in ("p50_us", "p95_us", "p99_us", "max_us")},
    }


def stored_heartbeats(cluster: EmbeddedCluster) -> int:
    return int(cluster.psql("SELECT count(*) FROM heartbeats", database="nexmdm"))


def worker_rss_mb(server: BenchServer) -> list[float]:
    """RSS of the workers that serve heartbeats (the device plane's, or every worker of one plane)."""
    return sorted(round(p.memory_info().rss / 2**20, 1) for p in server.workers("device") or server.workers())


def scrape(server: BenchServer, prefix: str) -> dict[str, float]:
    """The server's samples (all workers) whose series starts with ``prefix``."""
    req = urllib.request.Request(server.admin_url + "/metrics", headers={"x-admin": server.admin_key})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return {series: float(value) for series, _, value in
                (line.rpartition(" ") for line in resp.read().decode().splitlines())
                if series.startswith(prefix)}


def token_cache_misses(server: BenchServer) -> float:
    """nexmdm_token_cache_misses_total, all workers."""
    return sum(scrape(server, "nexmdm_token_cache_misses_total").values())


def rejected_since(server: BenchServer, before: dict[str, float]) -> dict[str, int]:
    """Heartbeats answered with an error since ``before`` (a scrape), by error code."""
    now = scrape(server, "nexmdm_heartbeats_rejected_total{")
    return {series.split('"')[1]: int(n - before.get(series, 0)) for series, n in now.items()
            if n > before.get(series, 0)}


def warm_up(wrk: str, server: BenchServer, tokens: Path, args: argparse.Namespace) -> dict[str, float]:
    """Post heartbeats until every worker has every device's token cached, as in a fleet's steady
    state (a device reporting each minute keeps its token cached in every worker): slices of wrk
    until one looks up (almost) no token, or ``--warmup-max-s``. Each keep-alive connection
    stays on one worker, so a device reaches both workers only after a few rounds."""
    started, slice_s = time.monotonic(), 5
    run_wrk(wrk, server.url, "heartbeat.lua", args.warmup_s, args.connections, tokens)
    while True:
        misses0 = token_cache_misses(server)
        out = run_wrk(wrk, server.url, "heartbeat.lua", slice_s, args.connections, tokens)
        share = (token_cache_misses(server) - misses0) / max(1.0, out["requests"])
        elapsed = time.monotonic() - started
        print(f"  warm-up {elapsed:4.0f} s: {share:.2%} of heartbeats looked their token up", flush=True)
        if share < 0.001 or elapsed >= args.warmup_max_s:
            return {"seconds": round(elapsed, 1), "last_miss_share": round(share, 5)}


def cpu_of(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


LAYOUTS = {"split": "the planes split (device plane + operator plane)",
           "single": "one plane (SPLIT_PLANES=false: reads and heartbeats share the workers)"}


def run_c_d(server: BenchServer, args: argparse.Namespace, var_dir: Path, layout: str) -> dict[str, Any]:
    """(c) the simulator at 2,500 heartbeats/s and, during it, (d) the open-loop reads (sent to
    the operator plane; to the one plane when not split)."""
    print(f"bench: [{layout}] (c) simulator {args.sim_devices:,} devices at --interval {args.sim_interval} "
          f"for {args.sim_duration} s, with (d) reads ...", flush=True)
    report_path = var_dir / f"simulator-report-{layout}.json"
    rss_start = worker_rss_mb(server)
    rejected0 = scrape(server, "nexmdm_heartbeats_rejected_total{")
    sim_cmd = [sys.executable, "-m", "simulator", "--devices", str(args.sim_devices),
               "--duration", str(args.sim_duration), "--interval", str(args.sim_interval),
               "--jitter", str(args.sim_interval / 4), "--ramp-up", str(args.sim_ramp_up), "--quiet",
               "--admin-key", server.admin_key,
               "--url", server.url, "--admin-url", server.admin_url, "--output", str(report_path)]
    sim = subprocess.Popen(sim_cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sim_ps = psutil.Process(sim.pid)
    # Enrollment and ramp-up first; readers start with the steady state.
    time.sleep(min(15, args.sim_duration / 4))
    cpu0, sim_cpu0, t0 = server.cpu_seconds(), cpu_of([sim_ps]), time.monotonic()
    readers = subprocess.Popen(
        [sys.executable, "-m", "bench.readers", "--url", server.admin_url, "--admin-key", server.admin_key,
         "--max-id", str(args.fleet), "--duration", str(max(10, args.sim_duration - 25))],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Worker RSS every 30 s while (c) and (d) run: flat, or still growing at the end?
    rss_series = [{"t_s": round(time.monotonic() - t0), "mb": worker_rss_mb(server)}]
    while readers.poll() is None:
        try:
            readers.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rss_series.append({"t_s": round(time.monotonic() - t0), "mb": worker_rss_mb(server)})
    readers_out, readers_err = readers.communicate()
    cpu1, sim_cpu1, wall = server.cpu_seconds(), cpu_of([sim_ps]), time.monotonic() - t0
    sim_out, _ = sim.communicate(timeout=args.sim_duration + 300)
    rss_end = worker_rss_mb(server)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    c_simulator = {
        "exit_code": sim.returncode, "report": report, "output_tail": sim_out[-3000:],
        "cpu_cores": {**{k: round((cpu1[k] - cpu0[k]) / wall, 2) for k in cpu1},
                      "simulator": round((sim_cpu1 - sim_cpu0) / wall, 2)},
        "worker_rss_mb": {"start": rss_start, "end": rss_end, "every_30_s": rss_series},
        "server_rejected": rejected_since(server, rejected0),
    }
    d_reads = json.loads(readers_out.strip().splitlines()[-1]) if readers_out else {
        "error": readers_err[-2000:]}
    return {"c_simulator": c_simulator, "d_reads": d_reads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite")
    parser.add_argument("--saturation-s", type=int, default=20)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--wrk-devices", type=int, default=20_000, help="devices whose heartbeats wrk posts")
    parser.add_argument("--warmup-s", type=int, default=20, help="first warm-up slice")
    parser.add_argument("--warmup-max-s", type=int, default=90,
                        help="stop warming up after this long even if tokens are still looked up")
    parser.add_argument("--sim-devices", type=int, default=10_000)
    parser.add_argument("--sim-interval", type=float, default=4.0)
    parser.add_argument("--sim-duration", type=int, default=60)
    parser.add_argument("--fleet", type=int, default=150_000, help="devices enrolled in all for the reads")
    parser.add_argument("--dedup-bucket-s", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="WEB_CONCURRENCY (make run's default is 2)")
    parser.add_argument("--sim-ramp-up", type=float, default=10.0,
                        help="seconds over which the simulated devices come online")
    parser.add_argument("--layouts", default="split,single",
                        help="server layouts to run (c) and (d) under, in order: split, single (a and b: the first)")
    args = parser.parse_args(argv)
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not args.layouts or any(x not in LAYOUTS for x in args.layouts):
        parser.error(f"--layouts: a comma-separated list of {', '.join(LAYOUTS)}")

    wrk = ensure_wrk()
    var_dir = ROOT / "var" / "bench-suite"
    if var_dir.exists():
        EmbeddedCluster(var_dir / "pg").stop()
        shutil.rmtree(var_dir)
    print(f"bench: starting the service as `make run` does (cluster in {var_dir}) ...", flush=True)
    # Compressed time: at --interval 4 ± 1 a device sends every 3-5 s, and wrk revisits a device
    # every few seconds, so the dedup bucket must be shorter than that or many sends would be
    # (correctly) answered "duplicate" and cost the server less than a real fleet's heartbeats.
    server = start(var_dir, port=8766, workers=args.workers, split=args.layouts[0] == "split",
                   DEDUP_BUCKET_SECONDS=str(args.dedup_bucket_s))
    cluster = EmbeddedCluster(var_dir / "pg")
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}}
    try:
        bystanders = max(0, args.fleet - args.sim_devices)
        print(f"bench: enrolling {bystanders:,} devices (the simulator enrolls its {args.sim_devices:,}) ...")
        t0 = time.perf_counter()
        devices = enroll_devices(server, bystanders, prefix="fleet", batch=10_000)
        results["enroll"] = {"devices": bystanders, "seconds": round(time.perf_counter() - t0, 2)}
        tokens = var_dir / "tokens.txt"
        tokens.write_text("\n".join(d["token"] for d in devices[: args.wrk_devices]))

        print("bench: (a) warm-up, then saturation with wrk ...", flush=True)
        # Steady state: every device's token is in every worker's cache (a fleet reporting each
        # minute keeps them there); the warm-up sends each device a few heartbeats first.
        results["a_warm_up"] = warm_up(wrk, server, tokens, args)
        before = stored_heartbeats(cluster)
        cpu0 = server.cpu_seconds()
        t0 = time.monotonic()
        sat = run_wrk(wrk, server.url, "heartbeat.lua", args.saturation_s, args.connections, tokens)
        wall = time.monotonic() - t0
        cpu1 = server.cpu_seconds()
        sat["stored_per_s"] = (stored_heartbeats(cluster) - before) / wall
        sat["cpu_cores"] = {k: round((cpu1[k] - cpu0[k]) / wall, 2) for k in cpu1}
        results["a_saturation"] = sat

        print("bench: (b) trivial endpoint with wrk ...", flush=True)
        triv = run_wrk(wrk, server.url + "/healthz", "trivial.lua", args.saturation_s, args.connections, tokens)
        results["b_trivial"] = triv
        results["b_ratio"] = round(sat["rate_per_s"] / triv["rate_per_s"], 3)
        # wrk leaves each worker a backlog of accepted requests, and the load shedding it
        # provoked decays over about a second after that: (c) starts on a settled server.
        time.sleep(5)

        results.update(run_c_d(server, args, var_dir, "split" if args.layouts[0] == "split" else "single"))
    finally:
        server.stop()
    for layout in args.layouts[1:]:
        # The same database and fleet, served the other way; (c) and (d) again, side by side.
        print(f"bench: restarting the service with {LAYOUTS[layout]} for (c) and (d) ...", flush=True)
        time.sleep(2)
        server = start(var_dir, port=8766, workers=args.workers, split=layout == "split",
                       DEDUP_BUCKET_SECONDS=str(args.dedup_bucket_s))
        try:
            time.sleep(5)
            other = run_c_d(server, args, var_dir, layout)
            results[f"{layout}_layout"] = {"c_simulator": other["c_simulator"], "d_reads": other["d_reads"]}
        finally:
            server.stop()
    results["layouts"] = args.layouts

    print_table(results)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    text = json.dumps(results, indent=2, default=str) + "\n"
    (out_dir / f"bench-{stamp}.json").write_text(text)
    (out_dir / "latest.json").write_text(text)
    print(f"\nwritten: bench/results/bench-{stamp}.json")
    return 0


def _rss_second_half(rss: dict[str, Any]) -> str:
    """Each worker's RSS at the middle and at the end of the sampled run: growth that goes on to
    the end shows here, a start-up plateau does not."""
    series = rss.get("every_30_s") or []
    if len(series) < 3:
        return "n/a"
    mid, end = series[len(series) // 2], series[-1]
    return f"{mid['mb']} at {mid['t_s']} s -> {end['mb']} at {end['t_s']} s"


def _pick(report: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        node: Any = report
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def print_table(r: dict[str, Any]) -> None:
    """The summary table, with each target."""
    sat, triv, sim, reads = r["a_saturation"], r["b_trivial"], r["c_simulator"], r["d_reads"]
    rep = sim["report"]
    rows = [
        ("a", "heartbeats/s at saturation (wrk)", f"{sat['rate_per_s']:,.0f} (stored {sat['stored_per_s']:,.0f})",
         ">= 4,000", sat["rate_per_s"] >= 4000),
        ("a", "  p50 / p95 / p99", f"{sat['p50_ms']:.1f} / {sat['p95_ms']:.1f} / {sat['p99_ms']:.1f} ms", "", None),
        ("b", "trivial endpoint req/s", f"{triv['rate_per_s']:,.0f}", "", None),
        ("b", "heartbeat / trivial", f"{r['b_ratio']:.2f}", ">= 0.70", r["b_ratio"] >= 0.7),
    ]
    p = {q: _pick(rep, f"latency_ms.heartbeat.{q}", f"latency_ms.{q}", f"heartbeat.{q}_ms", f"{q}_ms")
         for q in ("p50", "p95", "p99", "p999")}
    lost = _pick(rep, "no_loss.lost", "lost")
    errors = _pick(rep, "errors.total", "error_count", "errors")
    rows += [
        ("c", "simulator p50 / p95 / p99 / p999",
         " / ".join("?" if v is None else f"{v:.1f}" for v in p.values()) + " ms", "", None),
        ("c", "  p95", f"{p['p95']}", "< 50 ms", p["p95"] is not None and p["p95"] < 50),
        ("c", "  p99", f"{p['p99']}", "< 150 ms", p["p99"] is not None and p["p99"] < 150),
        ("c", "  lost / errors", f"{lost} / {errors}", "0 / 0", lost == 0 and errors in (0, {})),
        ("c", "  server's error answers by code",
         ", ".join(f"{k} {v}" for k, v in sim.get("server_rejected", {}).items()) or "none", "", None),
        ("c", "  CPU cores: API / PostgreSQL / simulator",
         f"{sim['cpu_cores'].get('api')} / {sim['cpu_cores'].get('db')} / {sim['cpu_cores'].get('simulator')}",
         "", None),
        ("c", "  worker RSS start -> end (MB)", f"{sim['worker_rss_mb']['start']} -> {sim['worker_rss_mb']['end']}",
         "", None),
        ("c", "  worker RSS, second half of the run (MB)", _rss_second_half(sim["worker_rss_mb"]), "", None),
    ]
    if "device_status" in reads:
        rows += [
            ("d", "device status p95", f"{reads['device_status']['p95_ms']:.1f} ms", "< 5 ms",
             reads["device_status"]["p95_ms"] < 5),
            ("d", "fleet summary p95", f"{reads['fleet_summary']['p95_ms']:.1f} ms", "< 20 ms",
             reads["fleet_summary"]["p95_ms"] < 20),
        ]
    print()
    print(f"{'':2} {'measure':42} {'value':>34}  {'target':10} verdict")
    for part, name, value, target, ok in rows:
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        print(f"{part:2} {name:42} {value:>34}  {target:10} {verdict}")
    layouts = r.get("layouts") or ["split"]
    if len(layouts) > 1:
        print_side_by_side(r, layouts)


def _layout_figures(c: dict[str, Any], d: dict[str, Any]) -> dict[str, str]:
    rep = c.get("report") or {}
    q = {k: _pick(rep, f"latency_ms.heartbeat.{k}") for k in ("p50", "p95", "p99", "p999")}

    def read(kind: str) -> str:
        figures = d.get(kind) or {}
        return f"{figures.get('p50_ms', '?')} / {figures.get('p95_ms', '?')} / {figures.get('p99_ms', '?')} ms"

    return {
        "(c) heartbeat p50 / p95 / p99 / p999": " / ".join("?" if v is None else f"{v:.1f}" for v in q.values())
        + " ms",
        "(c) lost / errors": f"{_pick(rep, 'no_loss.lost')} / {_pick(rep, 'errors.total')}",
        "(c) CPU cores: API / PostgreSQL": f"{c['cpu_cores'].get('api')} / {c['cpu_cores'].get('db')}",
        "(d) device status p50 / p95 / p99": read("device_status"),
        "(d) fleet summary p50 / p95 / p99": read("fleet_summary"),
        "(d) answers": ", ".join(f"{k} {v}" for k, v in sorted((d.get("statuses") or {}).items())),
    }


def print_side_by_side(r: dict[str, Any], layouts: list[str]) -> None:
    """(c) and (d) under each layout, in one table (same machine, same database, one run)."""
    columns = []
    for i, layout in enumerate(layouts):
        part = r if i == 0 else r.get(f"{layout}_layout", {})
        if "c_simulator" in part:
            columns.append((layout, _layout_figures(part["c_simulator"], part["d_reads"])))
    if len(columns) < 2:
        return
    print()
    print(f"{'side by side, one run':38} " + " ".join(f"{name:>34}" for name, _ in columns))
    for measure in columns[0][1]:
        print(f"{measure:38} " + " ".join(f"{figures[measure]:>34}" for _, figures in columns))


if __name__ == "__main__":
    sys.exit(main())
