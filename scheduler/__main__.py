"""``python -m scheduler [run JOB | restore MANIFEST | verify MANIFEST | jobs]``.

Without a command: run the schedule in this process, in the foreground (for deployments that
set SCHEDULER_ENABLED=false on the API). Exit codes: 0 done, 1 failed or refused, 2 usage,
3 skipped because another runner holds the job's lock.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from config.logs import configure_logging
from config.settings import Settings
from db.engine import database_url_for_cli, make_engine
from db.job_runs import list_runs
from scheduler.locking import JobReport, run_locked
from scheduler.service import JOBS, add_jobs, run_job

EXIT_SKIPPED = 3


def _say(line: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"{stamp} {line}", flush=True)


def _summary(report: JobReport) -> int:
    if report.status == "skipped":
        _say(f"{report.job}: skipped ({report.skipped_reason}); run {report.run_id}")
        return EXIT_SKIPPED
    if report.status == "failed":
        _say(f"{report.job}: FAILED after {report.duration_s:.1f} s: {report.error}; run {report.run_id}")
        return 1
    _say(f"{report.job}: succeeded in {report.duration_s:.1f} s; rows affected {report.rows_affected}; "
         f"run {report.run_id}")
    print(json.dumps(report.detail, indent=2, default=str), flush=True)
    return 0


def _engine(settings: Settings, url: str):  # noqa: ANN202
    return make_engine(settings.with_overrides(db_pool_size=3, db_max_overflow=2), url,
                       application_name="nexmdm-scheduler")


def cmd_export(settings: Settings, partitions: list[str]) -> int:
    """The child process of a nightly run: export partitions, one result line each."""
    from scheduler.jobs.archive import export_for_parent

    if not settings.database_url:
        print("export needs DATABASE_URL", file=sys.stderr)
        return 2
    return export_for_parent(settings, partitions)


def cmd_verify(manifest_path: Path) -> int:
    """Check an archive against its manifest, without a database."""
    from scheduler.jobs.archive import ArchiveError, Manifest, verify_archive

    try:
        manifest = Manifest.load(manifest_path)
        data = manifest.data_path(manifest_path)
        verify_archive(data, manifest.sha256, manifest.row_count, manifest.size_bytes)
    except ArchiveError as exc:
        _say(f"NOT OK: {exc}")
        return 1
    _say(f"OK: {data} holds {manifest.row_count:,} rows of {manifest.partition}, sha256 {manifest.sha256}")
    return 0


def cmd_serve(settings: Settings, url: str) -> int:
    """Run the schedule in the foreground until interrupted."""
    from apscheduler.schedulers.blocking import BlockingScheduler

    engine = _engine(settings, url)
    scheduler = BlockingScheduler(timezone=UTC)
    add_jobs(scheduler, settings, engine, trigger="scheduler-process")
    _say("scheduler running (Ctrl-C stops): " + ", ".join(
        f"{job} {cron}" for job, cron in (("partitions", settings.partitions_cron),
                                         ("nightly", settings.nightly_cron),
                                         ("reconcile", settings.reconcile_cron))))
    try:
        scheduler.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        engine.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scheduler", description="NexMDM scheduled jobs.")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run one job now, with progress and a summary")
    run.add_argument("job", choices=JOBS)
    restore = sub.add_parser("restore", help="verify an archive and attach it again as a partition")
    restore.add_argument("manifest", type=Path)
    verify = sub.add_parser("verify", help="check an archive file against its manifest (no database)")
    verify.add_argument("manifest", type=Path)
    jobs = sub.add_parser("jobs", help="recent job runs")
    jobs.add_argument("--job", choices=JOBS + ("restore",))
    jobs.add_argument("--limit", type=int, default=20)
    export = sub.add_parser("export", help=argparse.SUPPRESS)
    export.add_argument("partitions", nargs="+")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings, level="WARNING")

    if args.command == "export":
        return cmd_export(settings, args.partitions)
    if args.command == "verify":
        return cmd_verify(args.manifest)
    with database_url_for_cli(settings) as url:
        settings = settings.with_overrides(database_url=url)
        if args.command is None:
            configure_logging(settings)
            return cmd_serve(settings, url)
        engine = _engine(settings, url)
        try:
            if args.command == "run":
                _say(f"{args.job}: starting")
                return _summary(run_job(args.job, engine, settings, trigger="cli", progress=_say))
            if args.command == "restore":
                from scheduler.jobs.archive import restore_archive

                # Under the nightly job's lock: a restore and an archive of the same day never overlap.
                report = run_locked(engine, "restore", lambda: restore_archive(engine, args.manifest, _say),
                                    trigger="cli", lock="nightly")
                return _summary(report)
            if args.command == "jobs":
                with engine.connect() as conn:
                    runs = list_runs(conn, args.job, args.limit)
                    conn.rollback()
                for r in runs:
                    took = f"{r['duration_s']:.1f}s" if r["duration_s"] is not None else "-"
                    extra = r["error"] or (r["detail"] or {}).get("skipped") or ""
                    print(f"{r['run_id']:>6} {r['started_at']:%Y-%m-%d %H:%M:%S} {r['job']:<10} "
                          f"{r['status']:<9} {took:>7} rows={r['rows_affected']} {r['trigger']} {extra}")
                return 0
        finally:
            engine.dispose()
    return 2


if __name__ == "__main__":
    sys.exit(main())
