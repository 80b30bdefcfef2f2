"""``python -m api serve``: everything ``make run`` needs, in the foreground.

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
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

from api.metrics import prepare_multiproc_dir
from api.supervisor import PlaneSupervisor, planes_to_run
from config.admin_key import admin_key_path, ensure_admin_key
from config.settings import Settings
from db.engine import embedded_cluster, make_engine
from db.events import maintain_event_partitions
from db.migrate import upgrade
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
        print(f"nexmdm: embedded PostgreSQL ready at {url}", flush=True)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["webhooks"]:
        from api.webhooks_cli import run

        return run(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m api", description="Run the NexMDM API.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="embedded DB (if DATABASE_URL is unset) + migrations + both planes")
    sub.add_parser("webhooks", help="add, list, delete webhooks and read their delivery logs (--help)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(Settings.from_env())
    return 2


if __name__ == "__main__":
    sys.exit(main())
