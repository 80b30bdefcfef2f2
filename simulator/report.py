"""The verdict (each SLI against its target) and the report, as text and as JSON.

The text keeps the original load test's shape: configuration, heartbeat latency
p50/p95/p99/p999 with targets, each SLI check with PASS/FAIL, then ``ALL SLI TARGETS MET`` or
the list of what failed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

POOL_SUSTAINED_S = 10  # utilisation counts as sustained when it holds for this many 1-s samples


@dataclass(frozen=True)
class Targets:
    """SLI targets; the defaults are the seed's from DESIGN.md (the floor, not the goal)."""

    heartbeat_p95_ms: float = 150.0
    heartbeat_p99_ms: float = 300.0
    read_p95_ms: float = 20.0
    error_rate_pct: float = 0.5
    pool_utilisation_pct: float = 80.0


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


def check_slis(
    heartbeat_ms: dict[str, float | None],
    read_ms: dict[str, float | None] | None,
    error_rate_pct: float | None,
    lost: int | None,
    duplicates_stored: int | None,
    pool_pct: float | None,
    targets: Targets = SEED_TARGETS,
) -> list[SliCheck]:
    """Every SLI check. ``read_ms`` None: no read mix; ``lost`` None: not checked yet (N/A);
    ``pool_pct`` None: the server exposes no pool figures (N/A)."""
    checks = [
        _below("heartbeat p95", heartbeat_ms.get("p95"), targets.heartbeat_p95_ms, "ms"),
        _below("heartbeat p99", heartbeat_ms.get("p99"), targets.heartbeat_p99_ms, "ms"),
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
        f"  client              {cfg['client']}, up to {cfg['max_connections']:,} connections",
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
        f"RSS {_fmt(gen['rss_mb'], 'MB')}, {gen['connections']} connections",
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
