"""``python -m api serve``: everything ``make run`` needs, in the foreground.
``python -m api keys create|list|revoke``: named operator keys with roles (see cmd_keys).

Starts the embedded PostgreSQL when DATABASE_URL is unset, migrates, creates the upcoming
partitions, empties the Prometheus multiprocess directory (a previous run's counts must not be
added to this one's), then runs one gunicorn (gevent workers) per plane: the device plane on
HOST:PORT and the operator plane on ADMIN_HOST:ADMIN_PORT (api/planes.py), both written into the
same multiprocess directory so the operator plane's /metrics shows the whole server. A plane
that crashes is restarted (api/supervisor.py). Ctrl-C or SIGTERM stops both planes and then the
embedded database it started.
"""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

from api.metrics import prepare_multiproc_dir
from api.supervisor import PlaneSupervisor, planes_to_run
from config.admin_key import admin_key_path, ensure_admin_key
from config.settings import Settings
from db.audit import AuditRecord, record_audit
from db.engine import database_url_for_cli, embedded_cluster, make_engine
from db.errors import DataError
from db.events import maintain_event_partitions
from db.migrate import upgrade
from db.operator_keys import ROLES, create_key, list_keys, revoke_key
from db.partitions import ensure_partitions


def metrics_dir_for(settings: Settings) -> Path:
    """Where the workers keep their Prometheus values: PROMETHEUS_MULTIPROC_DIR or var/prometheus."""
    return settings.prometheus_multiproc_dir or settings.var_dir / "prometheus"


def prepare_database(settings: Settings, url: str) -> list[str]:
    """Migrate and make today's and the upcoming partitions; returns the partitions created."""
    upgrade(url)
    engine = make_engine(settings.with_overrides(db_pool_size=1, db_max_overflow=0), url)
    try:
        with engine.begin() as conn:
            today = datetime.now(UTC).date()
            created = ensure_partitions(conn, today, settings.partition_premake_days)
            events_created, _ = maintain_event_partitions(conn, today, settings.partition_premake_days, None)
            return created + events_created
    finally:
        engine.dispose()


def serve(settings: Settings) -> int:
    """Run both planes in the foreground until interrupted; 0 after Ctrl-C/SIGTERM, 1 when a
    plane kept crashing."""
    cluster = None
    url = settings.database_url
    if not url:
        cluster = embedded_cluster(settings)
        print(f"nexmdm: starting the embedded PostgreSQL in {cluster.data_dir} ...", flush=True)
        url = cluster.start()
        print(f"nexmdm: embedded PostgreSQL ready at {cluster.display_url}", flush=True)
    try:
        created = prepare_database(settings, url)
        print(f"nexmdm: schema migrated; partitions created: {len(created)}", flush=True)
        key, from_file = ensure_admin_key(settings)
        if from_file:
            print(f"nexmdm: admin key (x-admin header) is in {admin_key_path(settings)}", flush=True)
        metrics_dir = prepare_multiproc_dir(metrics_dir_for(settings))
        env = dict(os.environ, DATABASE_URL=url, ADMIN_KEY=key, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
        if settings.split_planes:
            print(
                f"nexmdm: device plane on {settings.device_url} ({settings.web_concurrency} gevent workers); "
                f"operator plane (admin API, /metrics, /ops, scheduler) on {settings.operator_url} "
                f"({settings.admin_concurrency} worker); Ctrl-C stops both", flush=True,
            )
        else:
            print(
                f"nexmdm: serving both planes on {settings.device_url} "
                f"({settings.web_concurrency} gevent workers; SPLIT_PLANES=false); Ctrl-C stops", flush=True,
            )
        supervisor = PlaneSupervisor(planes_to_run(settings.split_planes), env,
                                     say=lambda line: print(line, flush=True))

        def _stop(signum: int, _frame: object) -> None:
            supervisor.request_stop(signum)

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        return supervisor.run()
    finally:
        if cluster is not None:
            print("nexmdm: stopping the embedded PostgreSQL", flush=True)
            cluster.stop()


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    """Create, list or revoke named operator keys, directly in the database (whoever can run
    this can read the database anyway); creations and revocations are audited as ``cli:<user>``."""
    actor = f"cli:{getpass.getuser()}"
    with database_url_for_cli(settings) as url:
        upgrade(url)
        engine = make_engine(settings.with_overrides(db_pool_size=1, db_max_overflow=0), url,
                             application_name="nexmdm-keys")
        try:
            with engine.begin() as conn:
                if args.keys_command == "list":
                    print(f"{'id':>4}  {'name':<24} {'role':<9} {'created':<20} {'by':<20} revoked")
                    for k in list_keys(conn):
                        revoked = k.revoked_at.strftime("%Y-%m-%d %H:%M") if k.revoked_at else "-"
                        print(f"{k.id:>4}  {k.name:<24} {k.role:<9} {k.created_at:%Y-%m-%d %H:%M:%S}  "
                              f"{k.created_by:<20} {revoked}")
                    return 0
                if args.keys_command == "create":
                    record, key = create_key(conn, args.name, args.role, created_by=actor)
                    action = "key.create"
                else:
                    ref: int | str = int(args.key) if args.key.isdigit() else args.key
                    record = revoke_key(conn, ref)
                    action = "key.revoke"
                record_audit(conn, AuditRecord(
                    actor=actor, actor_role="admin", action=action, outcome="ok", target=f"key:{record.id}",
                    source_addr="local", detail={"name": record.name, "role": record.role}))
        except (DataError, ValueError) as exc:
            print(f"nexmdm keys: {exc}", file=sys.stderr)
            return 1
        finally:
            engine.dispose()
    if args.keys_command == "create":
        print(f"created operator key {record.name!r} (id {record.id}, role {record.role}); send it as x-admin.")
        print("It is shown this once; only its hash is stored:")
        print(key)
    else:
        print(f"revoked operator key {record.name!r} (id {record.id}) at {record.revoked_at:%Y-%m-%d %H:%M:%S %Z}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["webhooks"]:
        from api.webhooks_cli import run

        return run(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m api", description="Run the NexMDM API.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="embedded DB (if DATABASE_URL is unset) + migrations + both planes")
    sub.add_parser("webhooks", help="add, list, delete webhooks and read their delivery logs (--help)")
    keys = sub.add_parser("keys", help="named operator keys with roles (x-admin)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, choices=ROLES,
                        help="viewer: reads, metrics, pool health; operator: also jobs, token rotation "
                             "and revocation; admin: also enrollment and keys")
    keys_sub.add_parser("list", help="every key (never the key itself)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id or name")
    revoke.add_argument("key", help="the key's id or name")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(Settings.from_env())
    if args.command == "keys":
        return cmd_keys(Settings.from_env(), args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
