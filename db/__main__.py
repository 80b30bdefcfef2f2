"""``python -m db migrate | backfill-last-status | start | stop | remove | url | psql | replica start|stop``:
database chores."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from config.settings import Settings
from db.embedded import DB_NAME, DB_USER
from db.engine import database_url_for_cli, embedded_cluster, make_engine
from db.fleet import backfill_last_status
from db.migrate import upgrade


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m db", description="NexMDM database chores.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply the Alembic migrations")
    sub.add_parser("backfill-last-status", help="build device_last_status from heartbeats")
    sub.add_parser("start", help="start the embedded PostgreSQL (on the port it had before)")
    sub.add_parser("stop", help="stop the embedded PostgreSQL")
    replica = sub.add_parser("replica", help="a local streaming replica of the embedded PostgreSQL (pg_basebackup)")
    replica.add_argument("action", choices=("start", "stop", "remove"),
                         help="start (copying the primary on first use), stop, or remove its data")
    sub.add_parser("remove", help="stop the embedded PostgreSQL and delete it, data included")
    sub.add_parser("url", help="print the embedded PostgreSQL's URL, password included")
    sub.add_parser("psql", help="psql into the embedded database as the project's role")
    args = parser.parse_args(argv)
    settings = Settings.from_env()

    if args.command == "replica":
        return replica_command(settings, args.action)
    if args.command == "start":
        cluster = embedded_cluster(settings)
        cluster.start()
        print(f"{cluster.display_url} (password in {cluster.password_file})")
        return 0
    if args.command == "remove":
        embedded_cluster(settings).remove()
        print("removed")
        return 0
    if args.command == "url":
        print(embedded_cluster(settings).start())
        return 0
    if args.command == "psql":
        cluster = embedded_cluster(settings)
        cluster.start()
        env = dict(os.environ, PGPASSWORD=cluster.password)
        argv_psql = [str(cluster.bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", DB_USER, DB_NAME]
        return subprocess.run(argv_psql, env=env, check=False).returncode
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


def replica_command(settings: Settings, action: str) -> int:
    """``python -m db replica start|stop|remove`` on the embedded primary of this checkout."""
    from db.embedded import EmbeddedError
    from db.replica import local_replica

    if settings.database_url:
        print("DATABASE_URL is set: make a replica of that server with its own tools; "
              "this command copies the embedded PostgreSQL", file=sys.stderr)
        return 2
    copy = local_replica(settings)
    if action == "stop":
        copy.stop()
        print("replica stopped")
        return 0
    if action == "remove":
        copy.remove()
        print(f"replica stopped and {copy.data_dir} removed")
        return 0
    primary = copy.primary
    assert primary is not None
    try:
        if not (primary.initialized() and primary.running()):
            print("starting the embedded primary first ...", flush=True)
            primary.start()
        if not copy.initialized():
            print(f"copying the primary into {copy.data_dir} with pg_basebackup ...", flush=True)
        url = copy.start()
    except EmbeddedError as exc:
        print(f"replica: {exc}", file=sys.stderr)
        return 1
    print(url)
    print(f"streaming from the primary; serve operator reads from it with:\n  READ_DATABASE_URL={url} make run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
