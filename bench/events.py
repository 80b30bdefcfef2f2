"""``make bench-events``: a carrier outage at fleet scale.

150,000 devices (made set-based in SQL, not through HTTP), all online and known to the events
job; then 10 % fall silent at once. One run of the events job must record the 15,000
``device_offline`` events in < 5 s, and a webhook (a real HTTP receiver on 127.0.0.1) receives
them in batches. A run with nothing to report is timed first, side by side, as the baseline.
Runs against its own embedded PostgreSQL in var/bench-events (or ``--database-url``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from config.settings import PROJECT_ROOT, Settings
from db.events import maintain_event_partitions
from db.webhooks import create_webhook
from scheduler.jobs.webhooks import WebhookDispatcher
from scheduler.service import run_job

TARGET_S = 5.0


def seed_fleet(engine: Engine, devices: int, now: datetime, prefix: str = "evbench") -> None:
    """``devices`` devices, each seen 30 s ago and known to the events job as online (set-based)."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO devices (device_uid, token_hash) "
            "SELECT %(p)s || '-' || i, sha256((%(p)s || i)::bytea) FROM generate_series(1, %(n)s) i",
            {"p": prefix, "n": devices})
        conn.exec_driver_sql(
            """
            INSERT INTO device_last_status (device_id, bucket_ts, sent_at, received_at, clock_skew_s, battery_pct,
                charging, network_type, signal_dbm, app_version, os_version, uptime_s, free_storage_mb)
            SELECT id, %(seen)s, %(seen)s, %(seen)s, 0, 30 + id %% 70, false, 'cellular', -80, '4.2.0', '14',
                   86400, 4096
            FROM devices WHERE device_uid LIKE %(like)s
            """, {"seen": now - timedelta(seconds=30), "like": f"{prefix}-%"})
        conn.exec_driver_sql(
            "INSERT INTO device_event_state (device_id, online, battery_band, app_version, revoked) "
            "SELECT id, true, 'ok', '4.2.0', false FROM devices WHERE device_uid LIKE %(like)s",
            {"like": f"{prefix}-%"})
        maintain_event_partitions(conn, now.date(), 1, None)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
            "ANALYZE devices, device_last_status, device_event_state")


def silence(engine: Engine, share_pct: int, now: datetime, prefix: str = "evbench") -> int:
    """The outage: ``share_pct`` % of the devices last seen 10 minutes ago. Returns how many."""
    step = round(100 / share_pct)
    with engine.begin() as conn:
        return conn.exec_driver_sql(
            "UPDATE device_last_status s SET received_at = %(t)s FROM devices d "
            "WHERE d.id = s.device_id AND d.device_uid LIKE %(like)s AND d.id %% %(step)s = 0",
            {"t": now - timedelta(minutes=10), "like": f"{prefix}-%", "step": step}).rowcount


@dataclass
class OutageResult:
    devices: int
    silenced: int
    quiet_run_s: float
    burst_run_s: float
    events: dict[str, int]
    webhook_events: int
    webhook_batches: int
    webhook_s: float

    def lines(self) -> list[str]:
        """The figures as printed."""
        verdict = "MET" if self.burst_run_s < TARGET_S and self.events.get("device_offline") == self.silenced else \
            "NOT MET"
        return [
            f"  devices                 {self.devices:>10,}   ({self.silenced:,} silenced at once)",
            f"  events run, quiet fleet {self.quiet_run_s:>10.2f} s (nothing to record: the baseline)",
            f"  events run, outage      {self.burst_run_s:>10.2f} s  {self.events}",
            f"  webhook                 {self.webhook_events:>10,} events in {self.webhook_batches} batches,"
            f" {self.webhook_s:.2f} s",
            f"  target: {self.silenced:,} device_offline in one run < {TARGET_S:g} s: {verdict}",
        ]


def run_outage(engine: Engine, settings: Settings, devices: int = 150_000, share_pct: int = 10) -> OutageResult:
    """Seed, time a quiet run, silence ``share_pct`` %, time the run that records the outage, and
    deliver it to a webhook on 127.0.0.1."""
    from tests.support.receiver import Receiver

    now = datetime.now(UTC)
    seed_fleet(engine, devices, now)
    receiver = Receiver().start()
    try:
        with engine.begin() as conn:
            hook = create_webhook(conn, receiver.url, ["device_offline"], "bench-secret-0123456789")
        quiet = run_job("events", engine, settings, now=now, progress=lambda line: None)
        silenced = silence(engine, share_pct, now)
        burst = run_job("events", engine, settings, now=now + timedelta(seconds=30), progress=lambda line: None)
        if burst.status != "succeeded":
            raise RuntimeError(f"events run {burst.status}: {burst.error}")
        started = time.perf_counter()
        WebhookDispatcher(engine, settings).run_once()
        webhook_s = time.perf_counter() - started
        mine = [r for r in receiver.received if r.payload.get("webhook_id") == hook["id"]]
        received = {e["id"] for r in mine for e in r.payload["events"]}
    finally:
        receiver.stop()
    return OutageResult(devices, silenced, quiet.duration_s, burst.duration_s, burst.detail.get("events", {}),
                        len(received), len(mine), webhook_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=150_000)
    parser.add_argument("--silent-pct", type=int, default=10)
    parser.add_argument("--database-url", default=None, help="an empty, migrated database (default: embedded)")
    args = parser.parse_args(argv)
    from db.embedded import EmbeddedCluster
    from db.engine import make_engine
    from db.migrate import upgrade

    cluster = None
    url = args.database_url
    if url is None:
        cluster = EmbeddedCluster(PROJECT_ROOT / "var" / "bench-events")
        cluster.start()
        cluster.recreate_database()
        url = cluster.url
    try:
        upgrade(url)
        settings = Settings(database_url=url, db_pool_size=12, db_max_overflow=4)
        engine = make_engine(settings, url)
        print(f"bench-events: {args.devices:,} devices, {args.silent_pct} % go silent ...", flush=True)
        result = run_outage(engine, settings, args.devices, args.silent_pct)
        engine.dispose()
    finally:
        if cluster is not None:
            cluster.stop()
    print("\n".join(result.lines()))
    out: dict[str, Any] = {**result.__dict__, "measured_at": datetime.now(UTC).isoformat()}
    (PROJECT_ROOT / "bench" / "results" / "events.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0 if result.burst_run_s < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
