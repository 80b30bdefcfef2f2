"""python -m simulator — a realistic device fleet against a NexMDM server, with an SLI verdict.

    python -m simulator --devices N --duration S --admin-key K [--url U] [--admin-url A] [--interval 60]
        [--jitter 15] [--ramp-up S] [--output report.json] [--dry-run] [--read-rate R]
        [--progress-jsonl] [--find-capacity] [--connection-per-device | --new-connection]

Exit status: 0 every SLI holds, 1 one fails, 2 usage or connection error. See simulator/README.md
for the --progress-jsonl line schema.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from simulator.devices import NEW_CONNECTION, PER_DEVICE, POOLED, ReadMix
from simulator.report import SEED_TARGETS, Targets, render_text
from simulator.runner import LoadRun, SimConfig, run_load_test
from simulator.server import AdminApi, UsageError, check_server, default_token_cache

EXIT_OK, EXIT_SLI_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on usage errors too; keep its message
        self.print_usage(sys.stderr)
        sys.stderr.write(f"simulator: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The command line (DESIGN.md's contract plus tuning flags)."""
    p = _Parser(prog="python -m simulator", description="NexMDM device simulator and load test")
    p.add_argument("--devices", type=int, required=True, help="simulated devices")
    p.add_argument("--duration", type=float, required=True, help="seconds of load")
    p.add_argument("--admin-key", help="the operator key (x-admin); default: ADMIN_KEY, else the development "
                   "key the server stored in var/admin_key")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the device plane: heartbeats (default %(default)s)")
    p.add_argument("--admin-url", default=None,
                   help="the operator plane: enrollment, reads, pool health, the no-loss check "
                        "(default: --url's host on ADMIN_PORT, 8001; give --url again for a single-plane server)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between a device's heartbeats (60)")
    p.add_argument("--jitter", type=float, default=None,
                   help="± seconds around each interval (default 15, or interval/4 when --interval is given)")
    p.add_argument("--ramp-up", type=float, default=0.0, help="seconds over which devices come online (0)")
    p.add_argument("--output", type=Path, help="write the report (with per-second time series) as JSON here")
    p.add_argument("--dry-run", action="store_true", help="check server, key and plan; send no load")
    p.add_argument("--read-rate", type=float, default=0.0, help="fast reads per second mixed in (0 = none)")
    p.add_argument("--reads-only", action="store_true",
                   help="send only the read mix, no heartbeats: an operator's console beside a fleet that "
                        "another simulator (or real devices) drives; the devices read are this fleet's "
                        "(from the token cache, enrolled if missing)")
    p.add_argument("--progress-jsonl", action="store_true",
                   help="one JSON snapshot per second on stdout, then a final {'type': 'report'} line")
    p.add_argument("--find-capacity", action="store_true",
                   help="step the fleet up from --devices until an SLI fails; report the largest that passed")
    p.add_argument("--capacity-factor", type=float, default=1.5, help="fleet growth per step (1.5)")
    p.add_argument("--capacity-max", type=int, default=0, help="stop stepping at this many devices (0: 64 × start)")
    p.add_argument("--flaky-pct", type=float, default=5.0, help="share of flaky devices in %% (5)")
    p.add_argument("--skewed-clock-pct", type=float, default=0.0,
                   help="share of devices whose clock is 10-60 min off, in %% (0)")
    p.add_argument("--connections", type=int, default=512,
                   help="most keep-alive connections the fleet shares (512; reads always share them)")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--connection-per-device", action="store_true",
                       help="each device keeps its own keep-alive connection between heartbeats")
    modes.add_argument("--new-connection", action="store_true",
                       help="a new TCP connection for every heartbeat (as a phone behind NAT)")
    p.add_argument("--read-mix", type=_read_mix, default=ReadMix(),
                   help="read endpoints and weights, e.g. device_status:50,fleet_summary:5 "
                        "(default device_status:70,fleet_list:15,fleet_summary:15)")
    p.add_argument("--max-retries", type=int, default=5, help="retries of a failed heartbeat before giving up (5)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a request counts as timed out")
    p.add_argument("--client", choices=("raw", "ghc"), default="raw", help="HTTP client (raw; ghc=geventhttpclient)")
    p.add_argument("--token-cache", type=Path, help="token cache file (default var/simulator/tokens-HOST-PORT.json)")
    p.add_argument("--verify-sample", type=int, default=0, help="no-loss check on N random devices (0 = all)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the fleet's behaviour")
    seed = SEED_TARGETS
    p.add_argument("--target-p95-ms", type=float, default=seed.heartbeat_p95_ms, help="heartbeat p95 target (150)")
    p.add_argument("--target-p99-ms", type=float, default=seed.heartbeat_p99_ms, help="heartbeat p99 target (300)")
    p.add_argument("--target-read-p95-ms", type=float, default=seed.read_p95_ms, help="fast read p95 target (20)")
    p.add_argument("--target-error-pct", type=float, default=seed.error_rate_pct, help="error rate target (0.5)")
    p.add_argument("--target-db-cpu-pct", type=float, default=seed.db_cpu_pct,
                   help="PostgreSQL CPU target, %% of its host's cores (70); measured when the database is "
                        "on the server's host, else N/A")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress line")
    p.add_argument("--outage-pct", type=float, default=0.0,
                   help="silence this share of the fleet in %% (a carrier outage) and check the server's "
                   "device_offline/device_online events for exactly those devices (0 = no outage)")
    p.add_argument("--outage-at", type=float, default=30.0, help="seconds into the load the outage starts (30)")
    p.add_argument("--outage-for", type=float, default=240.0,
                   help="seconds the outage lasts (240; must exceed the server's OFFLINE_AFTER_SECONDS "
                   "plus its EVENTS_INTERVAL_S)")
    p.add_argument("--outage-grace", type=float, default=30.0,
                   help="seconds to wait after the run for the server's events job (30)")
    return p


def _read_mix(text: str) -> ReadMix:
    try:
        return ReadMix.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def default_admin_key() -> str | None:
    """ADMIN_KEY (through Settings), else the development key file a local server wrote."""
    from config.admin_key import admin_key_path
    from config.settings import Settings

    settings = Settings.from_env()
    if settings.admin_key:
        return settings.admin_key
    path = admin_key_path(settings)
    return path.read_text().strip() if path.exists() else None


def default_admin_url(url: str) -> str:
    """The operator plane beside a device plane: the same scheme and host, on ADMIN_PORT."""
    from urllib.parse import urlsplit

    from config.settings import Settings

    parts = urlsplit(url)
    if not parts.hostname:
        return url  # validate() names the bad --url
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{Settings.from_env().admin_port}"


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """SimConfig from parsed flags (jitter defaults to 15 s at 60 s, else a quarter interval)."""
    admin_key = args.admin_key or default_admin_key()
    if not admin_key:
        raise UsageError("--admin-key is required (no ADMIN_KEY set and no var/admin_key file)")
    jitter = args.jitter
    if jitter is None:
        jitter = 15.0 if args.interval == 60.0 else args.interval / 4
    return SimConfig(
        url=args.url.rstrip("/"), admin_url=(args.admin_url or default_admin_url(args.url)).rstrip("/"),
        admin_key=admin_key, devices=args.devices, duration_s=args.duration,
        interval_s=args.interval, jitter_s=jitter, ramp_up_s=args.ramp_up, read_rate=args.read_rate,
        read_mix=args.read_mix, reads_only=args.reads_only,
        connection_mode=PER_DEVICE if args.connection_per_device else NEW_CONNECTION if args.new_connection
        else POOLED,
        flaky_pct=args.flaky_pct, max_connections=args.connections, timeout_s=args.timeout, client=args.client,
        max_retries=args.max_retries, skewed_clock_pct=args.skewed_clock_pct,
        seed=args.seed, token_cache=args.token_cache, verify_sample=args.verify_sample,
        progress_jsonl=args.progress_jsonl, show_progress=not args.quiet,
        outage_pct=args.outage_pct, outage_at_s=args.outage_at, outage_for_s=args.outage_for,
        outage_grace_s=args.outage_grace,
        targets=Targets(heartbeat_p95_ms=args.target_p95_ms, heartbeat_p99_ms=args.target_p99_ms,
                        read_p95_ms=args.target_read_p95_ms, error_rate_pct=args.target_error_pct,
                        db_cpu_pct=args.target_db_cpu_pct),
    )


class Console:
    """Where output goes: with --progress-jsonl stdout carries only JSON lines, and every human
    line goes to stderr; otherwise the report goes to stdout and the live line to stderr."""

    def __init__(self, jsonl: bool, quiet: bool) -> None:
        self.jsonl = jsonl
        self.quiet = quiet
        self.human = sys.stderr if jsonl else sys.stdout
        self._tty = sys.stderr.isatty()

    def progress(self, snap: dict[str, Any]) -> None:
        """One per-second snapshot."""
        if self.jsonl:
            sys.stdout.write(json.dumps(snap, separators=(",", ":")) + "\n")
            sys.stdout.flush()
        if self.quiet:
            return
        line = (
            f"t={snap['t_s']:6.1f}s sent={snap['sent']:,} acked={snap['acked']:,} errors={snap['errors']:,} "
            f"rate={snap['rate_per_s']:,}/s p50={_ms(snap['p50_ms'])} p95={_ms(snap['p95_ms'])} "
            f"p99={_ms(snap['p99_ms'])} in-flight={snap['in_flight']} {snap['phase']} {snap['verdict_so_far']}"
        )
        if self._tty:
            sys.stderr.write("\r\x1b[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def end_progress(self) -> None:
        """Finish the live line."""
        if self._tty and not self.quiet:
            sys.stderr.write("\n")

    def report(self, report: dict[str, Any]) -> None:
        """The final report: text for people, one JSON line (without the series) for --progress-jsonl."""
        self.human.write(render_text(report) + "\n")
        self.human.flush()
        if self.jsonl:
            line = {k: v for k, v in report.items() if k != "timeseries"}
            sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
            sys.stdout.flush()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def dry_run(cfg: SimConfig, console: Console) -> int:
    """Check configuration, server and key; print the plan; send no load."""
    cfg.validate()
    api = AdminApi(cfg.operator_url, cfg.admin_key)
    try:
        check_server(api, cfg.url)
    finally:
        api.close()
    cache = cfg.token_cache or default_token_cache(cfg.url)
    plan = {
        "type": "plan", "url": cfg.url, "admin_url": cfg.operator_url, "devices": cfg.devices,
        "duration_s": cfg.duration_s,
        "interval_s": cfg.interval_s, "jitter_s": cfg.jitter_s, "ramp_up_s": cfg.ramp_up_s,
        "expected_heartbeats_per_s": round(cfg.expected_per_s, 2),
        "expected_heartbeats": math.floor(cfg.expected_per_s * max(0.0, cfg.duration_s - cfg.ramp_up_s / 2)),
        "equivalent_fleet_at_60s": cfg.equivalent_fleet_at_60s, "read_rate_per_s": cfg.read_rate,
        "flaky_pct": cfg.flaky_pct, "token_cache": str(cache), "server": "ok", "admin_key": "ok",
    }
    console.human.write(
        f"dry run: {cfg.url} (device plane) and {cfg.operator_url} (operator plane) answer and the admin key works\n"
        f"plan: {cfg.devices:,} devices, one heartbeat every {cfg.interval_s:g} s ± {cfg.jitter_s:g} s "
        f"→ {cfg.expected_per_s:,.1f} heartbeats/s (≈ {cfg.equivalent_fleet_at_60s:,} devices at 60 s), "
        f"for {cfg.duration_s:g} s (ramp-up {cfg.ramp_up_s:g} s): about {plan['expected_heartbeats']:,} heartbeats"
        f"{f', plus {cfg.read_rate:g} reads/s' if cfg.read_rate else ''}\n"
        f"tokens cached in {cache}\nno load sent\n"
    )
    if console.jsonl:
        sys.stdout.write(json.dumps(plan) + "\n")
    return EXIT_OK


def find_capacity(cfg: SimConfig, args: argparse.Namespace, console: Console, stopper: StopOnSignal
                  ) -> tuple[dict[str, Any], int]:
    """Step the fleet up by --capacity-factor until an SLI fails (or the cap); the summary report."""
    cap = args.capacity_max or cfg.devices * 64
    size = cfg.devices
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    while size <= cap:
        console.human.write(f"\n--- capacity step: {size:,} devices ---\n")
        step_cfg = replace(cfg, devices=size)
        report = run_load_test(step_cfg, console.progress, on_start=stopper.attach)
        console.end_progress()
        console.human.write(render_text(report) + "\n")
        steps.append({"devices": size, "equivalent_fleet_at_60s": step_cfg.equivalent_fleet_at_60s,
                      "verdict": report["verdict"], "failed": report["failed"],
                      "heartbeat_p99_ms": report["latency_ms"]["heartbeat"]["p99"],
                      "achieved_per_s": report["throughput"]["achieved_per_s"]})
        if stopper.stopping or report["verdict"] != "PASS":
            break  # a step cut short by a signal proves nothing either way
        best = report
        size = max(size + 1, int(size * args.capacity_factor))
    summary = {
        "type": "capacity",
        "steps": steps,
        "largest_passing_devices": best["config"]["devices"] if best else None,
        "largest_passing_equivalent_fleet_at_60s": best["config"]["equivalent_fleet_at_60s"] if best else None,
        "best_report": best,
        "verdict": "PASS" if best else "FAIL",
        "summary": (f"CAPACITY: {best['config']['devices']:,} devices passed every SLI "
                    f"(≈ {best['config']['equivalent_fleet_at_60s']:,} devices at 60 s)" if best
                    else f"CAPACITY: even {cfg.devices:,} devices failed an SLI"),
    }
    console.human.write(f"\n{summary['summary']}\n")
    if console.jsonl:
        sys.stdout.write(json.dumps({"type": "report", **{k: v for k, v in summary.items() if k != 'best_report'}})
                         + "\n")
    return summary, EXIT_OK if best else EXIT_SLI_FAILED


class StopOnSignal:
    """SIGINT/SIGTERM: the first ends the load early (the run still drains, checks for loss and
    reports); a second one aborts."""

    def __init__(self) -> None:
        self.load: LoadRun | None = None
        self.stopping = False

    def install(self) -> None:
        """Register the handlers with gevent's loop."""
        import gevent

        for signum in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(signum, self._handle)

    def attach(self, load: LoadRun) -> None:
        """The run that a signal stops."""
        self.load = load
        self.stopping = False

    def _handle(self) -> None:
        if self.stopping or self.load is None:
            sys.stderr.write("\nsimulator: aborted\n")
            os._exit(EXIT_USAGE)
        self.stopping = True
        sys.stderr.write("\nsimulator: stopping early; draining and checking for loss (again to abort)\n")
        self.load.request_stop()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    console = Console(args.progress_jsonl, args.quiet)
    stopper = StopOnSignal()
    stopper.install()
    try:
        cfg = config_from_args(args)
        if args.dry_run:
            cfg.validate()
            return dry_run(cfg, console)
        if args.find_capacity:
            result, code = find_capacity(cfg, args, console, stopper)
        else:
            result = run_load_test(cfg, console.progress, on_start=stopper.attach)
            console.end_progress()
            console.report(result)
            code = EXIT_OK if result["verdict"] == "PASS" else EXIT_SLI_FAILED
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(result, indent=2) + "\n")
            console.human.write(f"report written to {args.output}\n")
        return code
    except UsageError as exc:
        console.end_progress()
        sys.stderr.write(f"simulator: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\nsimulator: interrupted\n")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
