"""``python -m db migrate | backfill-last-status | start | stop | url``: database chores."""

from __future__ import annotations

import argparse
import sys
import time

from config.settings import Settings
from db.engine import database_url_for_cli, embedded_cluster, make_engine
from db.fleet import backfill_last_status
from db.migrate import upgrade


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m db", description="NexMDM database chores.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply the Alembic migrations")
    sub.add_parser("backfill-last-status", help="build device_last_status from heartbeats")
    sub.add_parser("start", help="start the embedded PostgreSQL and print its URL")
    sub.add_parser("stop", help="stop the embedded PostgreSQL")
    args = parser.parse_args(argv)
    settings = Settings.from_env()

    if args.command == "start":
        print(embedded_cluster(settings).start())
        return 0
    if args.command == "stop":
        embedded_cluster(settings).stop()
        print("stopped")
        return 0
    with database_url_for_cli(settings) as url:
        if args.command == "migrate":
            upgrade(url)
            print("migrated to head")
            return 0
        if args.command == "backfill-last-status":
            engine = make_engine(settings.with_overrides(db_pool_size=1, db_max_overflow=0), url)
            started = time.perf_counter()
            print("backfilling device_last_status from heartbeats ...", flush=True)
            with engine.begin() as conn:
                changed = backfill_last_status(conn)
            engine.dispose()
            took_s = time.perf_counter() - started
            print(f"device_last_status: {changed} rows inserted or moved forward in {took_s:.1f} s")
            return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
