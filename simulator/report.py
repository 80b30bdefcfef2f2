"""The verdict (each SLI against its target) and the report: the per-second progress
snapshot, the final report dict (what ``--output`` writes), and its text.

The text keeps the original load test's shape: configuration, heartbeat latency
p50/p95/p99/p999 with targets, each SLI check with PASS/FAIL, then ``ALL SLI TARGETS MET`` or
the list of what failed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from api import contract
from simulator.stats import KindStats, Stats, percentiles_ms

if TYPE_CHECKING:
    from simulator.runner import RunResult, SimConfig

POOL_SUSTAINED_S = 10  # utilisation counts as sustained when it holds for this many 1-s samples


@dataclass(frozen=True)
class Targets:
    """SLI targets; the defaults are the seed's (api/contract.py, from DESIGN.md: the floor, not the goal)."""

    heartbeat_p95_ms: float = contract.HEARTBEAT_P95_MS
    heartbeat_p99_ms: float = contract.HEARTBEAT_P99_MS
    read_p95_ms: float = contract.READ_P95_MS
    error_rate_pct: float = contract.ERROR_PCT
    pool_utilisation_pct: float = contract.POOL_WARN_PCT
    db_cpu_pct: float = 70.0


SEED_TARGETS = Targets()


@dataclass(frozen=True)
class SliCheck:
    """One SLI: measured value against its target. ``status`` is PASS, FAIL or N/A (not measured)."""

    name: str
    value: float | int | None
    target: str
    unit: str
    status: str


def _below(name: str, value: float | None, limit: float, unit: str) -> SliCheck:
    status = "FAIL" if value is None or value >= limit else "PASS"
    return SliCheck(name, value, f"< {limit:g}", unit, status)


def _zero(name: str, value: int | None) -> SliCheck:
    if value is None:
        return SliCheck(name, None, "= 0", "", "N/A")
    return SliCheck(name, value, "= 0", "", "PASS" if value == 0 else "FAIL")


def sustained_pool_pct(samples: list[float], window: int = POOL_SUSTAINED_S) -> float | None:
    """The highest mean utilisation over any ``window`` consecutive 1-s samples (None: no data)."""
    if not samples:
        return None
    if len(samples) < window:
        return round(sum(samples) / len(samples), 1)
    best = running = sum(samples[:window])
    for i in range(window, len(samples)):
        running += samples[i] - samples[i - window]
        best = max(best, running)
    return round(best / window, 1)


def db_cpu_pct(samples: list[tuple[float, float, int]]) -> float | None:
    """PostgreSQL's CPU over the run in % of its host's cores, from (monotonic time, CPU seconds
    so far, host cores) samples; None with fewer than two."""
    if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
        return None
    (t0, cpu0, _), (t1, cpu1, cores) = samples[0], samples[-1]
    return round(100.0 * max(0.0, cpu1 - cpu0) / (t1 - t0) / max(1, cores), 1)


def check_slis(
    heartbeat_ms: dict[str, float | None] | None,
    read_ms: dict[str, float | None] | None,
    error_rate_pct: float | None,
    lost: int | None,
    duplicates_stored: int | None,
    pool_pct: float | None,
    targets: Targets = SEED_TARGETS,
    db_cpu: float | None = None,
) -> list[SliCheck]:
    """Every SLI check. ``heartbeat_ms`` None: no heartbeats sent (--reads-only), so N/A;
    ``read_ms`` None: no read mix; ``lost`` None: not checked yet (N/A);
    ``pool_pct`` None: the server exposes no pool figures (N/A); ``db_cpu`` None: PostgreSQL's
    CPU was not measurable (N/A: the database is not on the server's host)."""
    if heartbeat_ms is None:
        checks = [SliCheck(f"heartbeat {q}", None, f"< {limit:g}", "ms", "N/A")
                  for q, limit in (("p95", targets.heartbeat_p95_ms), ("p99", targets.heartbeat_p99_ms))]
    else:
        checks = [_below("heartbeat p95", heartbeat_ms.get("p95"), targets.heartbeat_p95_ms, "ms"),
                  _below("heartbeat p99", heartbeat_ms.get("p99"), targets.heartbeat_p99_ms, "ms")]
    checks += [
        _below("error rate", error_rate_pct, targets.error_rate_pct, "%"),
        _zero("acknowledged heartbeats lost", lost),
        _zero("duplicates stored", duplicates_stored),
    ]
    if read_ms is not None:
        checks.append(_below("fast read p95", read_ms.get("p95"), targets.read_p95_ms, "ms"))
    if pool_pct is None:
        checks.append(SliCheck("pool utilisation (sustained)", None, f"< {targets.pool_utilisation_pct:g}", "%",
                               "N/A"))
    else:
        checks.append(_below("pool utilisation (sustained)", pool_pct, targets.pool_utilisation_pct, "%"))
    if db_cpu is None:
        checks.append(SliCheck("DB CPU", None, f"< {targets.db_cpu_pct:g}", "%", "N/A"))
    else:
        checks.append(_below("DB CPU", db_cpu, targets.db_cpu_pct, "%"))
    return checks


def verdict(checks: list[SliCheck]) -> tuple[bool, list[str]]:
    """(every measured SLI passed, names of the failed ones). N/A checks neither pass nor fail."""
    failed = [c.name for c in checks if c.status == "FAIL"]
    return not failed, failed


def summary_line(all_met: bool, failed: list[str]) -> str:
    """The report's last line."""
    return "ALL SLI TARGETS MET" if all_met else "SLI TARGETS NOT MET: " + ", ".join(failed)


def checks_as_json(checks: list[SliCheck]) -> list[dict[str, Any]]:
    """The checks as plain dicts."""
    return [asdict(c) for c in checks]


def error_rate_pct(hb: KindStats, rd: KindStats) -> float | None:
    """Failed requests (heartbeats and reads) in % of all attempts; None before any."""
    attempts = hb.ok + hb.errors + rd.ok + rd.errors
    return round(100.0 * (hb.errors + rd.errors) / attempts, 3) if attempts else None


def progress_snapshot(stats: Stats, window: dict[str, Any], read_window: dict[str, Any], sent_window: int,
                      lag_p99_ms: float | None, pool_samples: list[float], targets: Targets, *, t_s: float,
                      phase: str, expected_per_s: float, in_flight: int, connections: int,
                      pool_latest: float | None, db_cpu: float | None = None) -> dict[str, Any]:
    """One per-second ``progress`` line (the schema is in simulator/README.md)."""
    hb, rd = stats.kinds["heartbeat"], stats.kinds["read"]
    cumulative = percentiles_ms(hb.total)
    read_cumulative = percentiles_ms(rd.total) if rd.ok or rd.errors else None
    error_rate = error_rate_pct(hb, rd)
    checks = check_slis(cumulative, read_cumulative, error_rate, None, None, sustained_pool_pct(pool_samples),
                        targets, db_cpu)
    all_met, failed = verdict(checks)
    return {
        "type": "progress",
        "t_s": t_s,
        "phase": phase,
        "sent": stats.sent,
        "acked": hb.ok,
        "errors": hb.errors + rd.errors,
        "rate_per_s": window["ok"],
        "sent_per_s": sent_window,
        "expected_per_s": round(expected_per_s, 1),
        "p50_ms": cumulative["p50"], "p95_ms": cumulative["p95"], "p99_ms": cumulative["p99"],
        "p999_ms": cumulative["p999"], "max_ms": cumulative["max"],
        "window": {k: window[k] for k in ("ok", "errors", "p50", "p95", "p99", "p999", "max")},
        "reads": {"ok": rd.ok, "errors": rd.errors, "rate_per_s": read_window["ok"],
                  "p95_ms": read_cumulative["p95"] if read_cumulative else None},
        "error_rate_pct": error_rate,
        "in_flight": in_flight,
        "connections": connections,
        "lag_p99_ms": lag_p99_ms,
        "pool_utilisation_pct": pool_latest,
        "verdict_so_far": "PASS" if all_met else "FAIL",
        "failing": failed,
    }


def build_report(cfg: SimConfig, run: RunResult, no_loss: dict[str, Any]) -> dict[str, Any]:
    """The report dict (also what --output writes and the final --progress-jsonl line carries)."""
    stats = run.stats
    hb, rd = stats.kinds["heartbeat"], stats.kinds["read"]
    hb_pct = percentiles_ms(hb.total)
    error_rate = error_rate_pct(hb, rd)
    pool_pct = sustained_pool_pct(run.pool_samples)
    db_cpu = db_cpu_pct(run.db_cpu_samples)
    checks = check_slis(None if cfg.reads_only else hb_pct, percentiles_ms(rd.total) if cfg.read_rate > 0 else None,
                        error_rate,
                        no_loss.get("lost"), no_loss.get("duplicates_stored"), pool_pct, cfg.targets, db_cpu)
    if no_loss.get("errors"):  # what could not be read back cannot be claimed as kept
        checks = [SliCheck(c.name, c.value, c.target, c.unit, "FAIL") if c.name == "acknowledged heartbeats lost"
                  else c for c in checks]
    all_met, failed = verdict(checks)
    attempts = hb.ok + hb.errors + rd.ok + rd.errors
    new_version = sum(n for v, n in run.versions.items() if v != "1.0.0")
    return {
        "type": "report",
        "config": _config_section(cfg, run),
        "targets": asdict(cfg.targets),
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "throughput": _throughput_section(stats, run.load_s or 1.0),
        "latency_ms": {"heartbeat": {**hb_pct, "count": hb.ok},
                       "read": {**percentiles_ms(rd.total), "count": rd.ok},
                       "read_endpoints": {name[5:]: {**percentiles_ms(k.total), "count": k.ok, "errors": k.errors}
                                          for name, k in sorted(stats.kinds.items()) if name.startswith("read:")}},
        "errors": {"total": hb.errors + rd.errors, "attempts": attempts, "rate_pct": error_rate,
                   "by_kind": {**{f"heartbeat:{k}": v for k, v in hb.errors_by_kind.items()},
                               **{f"read:{k}": v for k, v in rd.errors_by_kind.items()}}},
        "no_loss": no_loss,
        "generator": _generator_section(run, attempts, stats.counters.get("queued_at_connection_limit", 0)),
        "pool": {"samples": len(run.pool_samples), "sustained_pct": pool_pct,
                 "max_pct": max(run.pool_samples) if run.pool_samples else None},
        "db_cpu": {"pct_of_host": db_cpu, "samples": len(run.db_cpu_samples), "source": run.db_cpu_source},
        "rollout": {"from": "1.0.0", "to": "1.1.0", "devices": cfg.devices, "devices_on_new": new_version},
        "slis": checks_as_json(checks),
        "verdict": "PASS" if all_met else "FAIL",
        "failed": failed,
        "warnings": _warnings(cfg, run, no_loss, attempts),
        "summary": summary_line(all_met, failed),
        "timeseries": run.series,
    }


def add_outage_check(report: dict[str, Any], outage: dict[str, Any]) -> None:
    """Put the outage check (simulator/outage.py) in the report; a mismatch fails the run."""
    report["outage"] = outage
    if not outage["exact"]:
        report["verdict"] = "FAIL"
        report["failed"] = [*report["failed"], "outage events"]
        report["summary"] = summary_line(False, report["failed"])


def _config_section(cfg: SimConfig, run: RunResult) -> dict[str, Any]:
    return {
        "url": cfg.url, "admin_url": cfg.operator_url, "devices": cfg.devices, "duration_s": cfg.duration_s,
        "interval_s": cfg.interval_s,
        "jitter_s": cfg.jitter_s, "ramp_up_s": cfg.ramp_up_s, "flaky_pct": cfg.flaky_pct,
        "skewed_clock_pct": cfg.skewed_clock_pct,
        "read_rate_per_s": cfg.read_rate, "read_mix": asdict(cfg.read_mix),
        "expected_heartbeats_per_s": round(cfg.expected_per_s, 2),
        "equivalent_fleet_at_60s": cfg.equivalent_fleet_at_60s, "client": cfg.client,
        "connection_mode": cfg.connection_mode,
        "max_connections": cfg.max_connections, "timeout_s": cfg.timeout_s, "seed": cfg.seed,
        "stopped_early_at_s": round(run.load_s, 2) if run.load_s < cfg.duration_s else None,
    }


def _throughput_section(stats: Stats, load_s: float) -> dict[str, Any]:
    c = stats.counters
    hb = stats.kinds["heartbeat"]
    return {
        "sent": stats.sent, "acknowledged": hb.ok, "stored": c.get("stored", 0),
        "duplicate": c.get("duplicate", 0), "achieved_per_s": round(hb.ok / load_s, 1),
        "lost_answer_retries": c.get("lost_answer_resends", 0),
        "retries_answered_duplicate": c.get("resend_answered_duplicate", 0),
        "first_sends_answered_duplicate": c.get("first_send_duplicate", 0),
        "retries": c.get("retries", 0), "gave_up": c.get("gave_up", 0),
        "abandoned_retries": c.get("abandoned_retries", 0),
        "skipped_offline": c.get("skipped_offline", 0), "went_offline": c.get("went_offline", 0),
        "reads": stats.kinds["read"].ok,
    }


def _generator_section(run: RunResult, attempts: int, queued: int) -> dict[str, Any]:
    return {
        "lag_p99_ms": run.lag_ms.get("p99"), "lag_max_ms": run.lag_ms.get("max"),
        "cpu_s": round(run.cpu_s, 2), "cpu_sys_s": round(run.cpu_sys_s, 2),
        "cpu_us_per_request": round(run.cpu_s * 1e6 / attempts, 1) if attempts else None,
        "rss_mb": run.rss_mb, "connections": run.connections, "connects": run.connects,
        "wall_s": round(run.wall_s, 2),
        "gc_max_pause_ms": run.gc_max_pause_ms, "sends_queued_at_connection_limit": queued,
    }


def _warnings(cfg: SimConfig, run: RunResult, no_loss: dict[str, Any], attempts: int) -> list[str]:
    c = run.stats.counters
    warnings = []
    queued = c.get("queued_at_connection_limit", 0)
    if queued > 0.01 * max(1, attempts):
        warnings.append(
            f"{queued:,} sends waited because all {cfg.max_connections} connections were busy: the server "
            "was not answering fast enough; the wait counts in the latencies (from the intended send time). "
            "--connections raises the concurrency offered to the server")
    elif run.lag_ms.get("p99") is not None and run.lag_ms["p99"] > 50:
        warnings.append(
            f"the generator ran behind its own schedule (lag p99 {run.lag_ms['p99']} ms) with connections to "
            "spare: it was short of CPU; latencies include that delay; use fewer devices per process or a less "
            "loaded machine")
    if c.get("first_send_duplicate"):
        warnings.append(
            f"{c['first_send_duplicate']:,} first sends were answered 'duplicate': two different heartbeats of "
            "one device fell into one dedup bucket. Expected when interval - jitter "
            f"({cfg.interval_s - cfg.jitter_s:g} s) is shorter than the server's DEDUP_BUCKET_SECONDS (10 s by "
            "default): the server then stores fewer rows than a real fleet would make it store")
    if no_loss.get("errors"):
        warnings.append(f"{no_loss['errors']} history reads failed during the no-loss check")
    if c.get("stored_twice"):
        warnings.append(f"{c['stored_twice']} resends of a stored heartbeat were answered 'stored' again")
    return warnings


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        text = f"{value:,.2f}" if value < 100 else f"{value:,.1f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip()


def render_text(report: dict[str, Any]) -> str:
    """The human report (the original's shape)."""
    cfg = report["config"]
    tp = report["throughput"]
    lines = [
        "NexMDM load test report",
        "=======================",
        "Configuration",
        f"  server              {cfg['url']}",
        f"  devices             {cfg['devices']:,}  (flaky {cfg['flaky_pct']:g} %)",
        f"  interval            {cfg['interval_s']:g} s ± {cfg['jitter_s']:g} s  "
        f"→ {cfg['expected_heartbeats_per_s']:,.1f} heartbeats/s",
        f"  equivalent fleet    {cfg['equivalent_fleet_at_60s']:,} devices at one heartbeat per 60 s",
        f"  duration            {cfg['duration_s']:g} s (ramp-up {cfg['ramp_up_s']:g} s)"
        + (f", stopped early at {cfg['stopped_early_at_s']:g} s" if cfg.get("stopped_early_at_s") else ""),
        f"  read mix            {_fmt(cfg['read_rate_per_s'], 'reads/s') if cfg['read_rate_per_s'] else 'off'}",
        f"  client              {cfg['client']}, " + (
            f"up to {cfg['max_connections']:,} shared connections" if cfg.get("connection_mode", "pooled") == "pooled"
            else "a connection per device" if cfg["connection_mode"] == "per-device"
            else "a new connection per heartbeat"),
        "",
        "Throughput",
        f"  heartbeats sent     {tp['sent']:,}  (attempts, retries included)",
        f"  acknowledged        {tp['acknowledged']:,}  (stored {tp['stored']:,}, duplicate {tp['duplicate']:,})",
        f"  achieved rate       {tp['achieved_per_s']:,.1f}/s  (expected {cfg['expected_heartbeats_per_s']:,.1f}/s)",
        f"  lost-answer resends {tp['lost_answer_retries']:,}  "
        f"(answered duplicate {tp['retries_answered_duplicate']:,})",
        f"  offline skips       {tp['skipped_offline']:,}    gave up {tp['gave_up']:,}",
        "",
        "Heartbeat latency (ms, from the intended send time)",
    ]
    hb = report["latency_ms"]["heartbeat"]
    targets = report["targets"]
    limits = {"p95": targets["heartbeat_p95_ms"], "p99": targets["heartbeat_p99_ms"]}
    for name in ("p50", "p95", "p99", "p999", "max"):
        value = hb.get(name)
        limit = limits.get(name)
        if limit is not None:
            mark = "PASS" if value is not None and value < limit else "FAIL"
            lines.append(f"  {name:<5} {_fmt(value):>10}   target < {limit:<6g} {mark}")
        else:
            lines.append(f"  {name:<5} {_fmt(value):>10}")
    read = report["latency_ms"].get("read")
    if read and read.get("count"):
        lines += ["", "Fast read latency (ms)"]
        for name in ("p50", "p95", "p99", "p999", "max"):
            suffix = f"   target < {targets['read_p95_ms']:g}" if name == "p95" else ""
            lines.append(f"  {name:<5} {_fmt(read.get(name)):>10}{suffix}")
        for endpoint, figures in report["latency_ms"].get("read_endpoints", {}).items():
            lines.append(f"  {endpoint:<14} p50 {_fmt(figures['p50'])}  p95 {_fmt(figures['p95'])}  "
                         f"p99 {_fmt(figures['p99'])}  ({figures['count']:,} reads)")
    err = report["errors"]
    lines += ["", f"Errors: {err['total']:,} of {err['attempts']:,} requests ({_fmt(err['rate_pct'], '%')})"]
    for kind, n in sorted(err["by_kind"].items()):
        lines.append(f"  {kind:<20} {n:,}")
    nl = report["no_loss"]
    lines += [
        "",
        "No-loss check (server's stored heartbeats vs every acknowledged one)",
        f"  devices checked     {nl['devices_checked']:,}{' (sample)' if nl.get('sampled') else ''}",
        f"  acknowledged        {nl['acknowledged_buckets']:,} buckets",
        f"  lost                {_fmt(nl['lost'])}",
        f"  duplicates stored   {_fmt(nl['duplicates_stored'])}",
        f"  stored, unanswered  {_fmt(nl.get('stored_unacknowledged'))}  (committed, but the answer never arrived: "
        "allowed)",
    ]
    if nl.get("errors"):
        lines.append(f"  history reads failed {nl['errors']:,}: the check is incomplete, so it fails")
    gen = report["generator"]
    lines += [
        "",
        f"Generator: lag p99 {_fmt(gen['lag_p99_ms'], 'ms')}, {_fmt(gen['cpu_us_per_request'], 'µs')} CPU/request, "
        f"RSS {_fmt(gen['rss_mb'], 'MB')}, {gen['connections']:,} connections at most "
        f"({gen.get('connects', 0):,} opened)",
    ]
    rollout = report.get("rollout")
    if rollout:
        lines.append(
            f"Rollout {rollout['from']} → {rollout['to']}: {rollout['devices_on_new']:,} of "
            f"{rollout['devices']:,} devices updated"
        )
    lines += ["", "SLI checks"]
    for c in report["slis"]:
        value = _fmt(c["value"], c["unit"])
        target = c["target"] + (" " + c["unit"] if c["unit"] else "")
        lines.append(f"  {c['name']:<30} {value:>14}   target {target:<10} {c['status']}")
    db_cpu = report.get("db_cpu") or {}
    if db_cpu.get("source"):
        lines.append(f"  (DB CPU: {db_cpu['source']}; % of the database host's cores)")
    outage = report.get("outage")
    if outage:
        lines.append(f"  {'outage events':<30} {outage['offline_events']:>7,} offline {outage['online_events']:>7,} "
                     f"online   of {outage['silenced']:,} silenced  {'PASS' if outage['exact'] else 'FAIL'}")
        lines.append(f"Outage ({outage['pct']:g} % at {outage['at_s']:g} s for {outage['for_s']:g} s): "
                     f"{outage['summary']}")
    for warning in report.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    lines += ["", report["summary"]]
    return "\n".join(lines)
