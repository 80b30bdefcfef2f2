"""``python -m api webhooks add|list|delete|deliveries``: manage webhooks through the operator API.

It speaks HTTP to a running server with the operator key (``--admin-key``, else ADMIN_KEY, else
the development key under var/), so it works against any deployment the operator can reach.
Exit codes: 0 done, 1 the server refused (the JSON error is printed), 2 usage or no answer.
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
from db.events import EVENT_TYPES


class CliError(Exception):
    """A call that did not succeed, with the exit code it maps to."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def call(url: str, admin_key: str, method: str, path: str, body: Any = None, timeout_s: float = 10.0) -> Any:
    """One JSON call to the operator API; raises CliError (1: refused, 2: no answer)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                 headers={"x-admin": admin_key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        raise CliError(f"HTTP {err.code}: {err.read().decode('utf-8', 'replace')}", 1) from None
    except (urllib.error.URLError, OSError) as err:
        raise CliError(f"no answer at {url}: {err}", 2) from None


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    """The argument parser of ``python -m api webhooks``."""
    parser = argparse.ArgumentParser(prog="python -m api webhooks", description="Manage NexMDM webhooks.")
    parser.add_argument("--url", default=f"http://{settings.host}:{settings.port}", help="the operator API")
    parser.add_argument("--admin-key", default=None, help="operator key (default: ADMIN_KEY or var/admin_key)")
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="register a webhook; prints its secret (shown once)")
    add.add_argument("target", metavar="URL", help="where to POST the batches (http or https)")
    add.add_argument("--type", dest="types", action="append", choices=EVENT_TYPES, default=[],
                     help="an event type to send (repeat; default: every type)")
    add.add_argument("--secret", default=None, help="signing secret, 16+ characters (default: generated)")
    sub.add_parser("list", help="active webhooks")
    delete = sub.add_parser("delete", help="stop a webhook (pending deliveries are cancelled)")
    delete.add_argument("id", type=int)
    log = sub.add_parser("deliveries", help="a webhook's delivery log, newest first")
    log.add_argument("id", type=int)
    log.add_argument("--status", choices=("pending", "delivered", "failed", "cancelled"), default=None)
    log.add_argument("--limit", type=int, default=20)
    return parser


def run(argv: list[str], settings: Settings | None = None, out: Any = None) -> int:
    """Run one webhooks command; prints JSON (one object) to ``out``; returns the exit code."""
    settings = settings or Settings.from_env()
    out = out or sys.stdout
    args = build_parser(settings).parse_args(argv)
    key = args.admin_key or settings.admin_key
    if not key and admin_key_path(settings).exists():
        key = admin_key_path(settings).read_text().strip()
    if not key:
        print("no operator key: pass --admin-key or set ADMIN_KEY", file=sys.stderr)
        return 2
    try:
        if args.action == "add":
            body: dict[str, Any] = {"url": args.target, "event_types": args.types}
            if args.secret:
                body["secret"] = args.secret
            result = call(args.url, key, "POST", "/v1/webhooks", body)
        elif args.action == "list":
            result = call(args.url, key, "GET", "/v1/webhooks")
        elif args.action == "delete":
            result = call(args.url, key, "DELETE", f"/v1/webhooks/{args.id}")
        else:
            query = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
            result = call(args.url, key, "GET", f"/v1/webhooks/{args.id}/deliveries{query}")
    except CliError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    print(json.dumps(result, indent=2), file=out)
    return 0
