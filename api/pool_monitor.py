"""``python -m api.pool_monitor``: print the running server's pool health (every worker) and
exit with its status, Nagios-style: 0 OK, 1 WARN, 2 CRITICAL, 3 UNKNOWN (server unreachable,
key refused, unexpected answer). Cron, a health check or a Nagios/Icinga check can call it as is.

It asks the server (GET /ops/pool_health) rather than the database: only the server knows its
workers' pools.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from config.admin_key import admin_key_path
from config.settings import Settings

EXIT_CODES = {"OK": 0, "WARN": 1, "CRITICAL": 2}
EXIT_UNKNOWN = 3


def exit_code_for(status: str) -> int:
    """0 OK, 1 WARN, 2 CRITICAL, 3 anything else."""
    return EXIT_CODES.get(status, EXIT_UNKNOWN)


def fetch_pool_health(url: str, admin_key: str, timeout_s: float) -> dict[str, Any]:
    """GET /ops/pool_health; raises OSError or ValueError on failure."""
    req = urllib.request.Request(url.rstrip("/") + "/ops/pool_health", headers={"x-admin": admin_key})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def format_report(url: str, health: dict[str, Any]) -> str:
    """Human-readable lines for one pool-health answer."""
    h = health
    lines = [
        f"NexMDM pool health at {url}: {h['status']}",
        f"  pool ({h['workers']} workers): {h['in_use']} of {h['capacity']} connections in use "
        f"(size {h['pool_size']} + max overflow {h['max_overflow']}), overflow {h['overflow']}, "
        f"utilisation {h['utilization_pct']} %, busiest worker {h['busiest_worker_utilization_pct']} %",
    ]
    for plane, p in (h.get("planes") or {}).items():
        lines.append(
            f"    {plane} plane ({p['workers']} workers): {p['in_use']} of {p['capacity']} in use, "
            f"busiest worker {p['busiest_worker_utilization_pct']} %"
        )
    pg = h.get("postgres")
    if pg:
        lines.append(
            f"  PostgreSQL: {pg['in_use']} of {pg['max_connections'] - pg['reserved_connections']} connections in use "
            f"({pg['utilization_pct']} %, {pg['in_use_by_nexmdm']} by NexMDM), headroom {pg['headroom']}, "
            f"max_connections {pg['max_connections']}"
        )
    else:
        lines.append(f"  PostgreSQL: unavailable ({h.get('postgres_error')})")
    lines.extend(f"  {reason}" for reason in h.get("reasons", []))
    return "\n".join(lines)


def _default_admin_key(settings: Settings) -> str | None:
    if settings.admin_key:
        return settings.admin_key
    path = admin_key_path(settings)
    return path.read_text().strip() if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(
        prog="python -m api.pool_monitor",
        description="Pool health of a running NexMDM server. Exit 0 OK, 1 WARN, 2 CRITICAL, 3 UNKNOWN.",
    )
    parser.add_argument("--url", default=settings.operator_url,
                        help="the operator plane (default: http://ADMIN_HOST:ADMIN_PORT from the environment)")
    parser.add_argument("--admin-key", default=None, help="operator key (default: ADMIN_KEY, else var/admin_key)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer as is")
    args = parser.parse_args(argv)
    key = args.admin_key or _default_admin_key(settings)
    if not key:
        print("UNKNOWN: no admin key (pass --admin-key or set ADMIN_KEY)", file=sys.stderr)
        return EXIT_UNKNOWN
    try:
        health = fetch_pool_health(args.url, key, args.timeout)
    except urllib.error.HTTPError as exc:
        print(f"UNKNOWN: {args.url} answered {exc.code}: {exc.read()[:200].decode(errors='replace')}",
              file=sys.stderr)
        return EXIT_UNKNOWN
    except (OSError, ValueError) as exc:
        print(f"UNKNOWN: cannot read pool health from {args.url}: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    print(json.dumps(health, indent=2) if args.json else format_report(args.url, health))
    return exit_code_for(str(health.get("status")))


if __name__ == "__main__":
    sys.exit(main())
