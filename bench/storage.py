"""``make bench-storage``: the two history tiers at 10,000 devices × 90 days.

Generates a day of heartbeats per device with the simulator's device model (battery, charging,
network, signal, uptime, storage; 60 s ± 15 s jitter; vectorised with numpy over all devices a
minute at a time), then:
  * cold tier: the days 16..89 days ago for every device, written as Parquet with the nightly
    job's writer (db/cold.py) and recorded as archived, as nightly would have left them;
  * hot tier: the days 0..14 days ago in PostgreSQL for the first --hot-devices devices
    (the 15th, plus --nightly-devices more devices, is the day the real nightly job archives);
  * nightly: the real job (export child, read-back verification, drop) on that day;
  * reads: GET /v1/devices/<id>/heartbeats through the Flask app in this process, by range.
Prints bytes per heartbeat in each tier, nightly seconds per million rows, growth a month at
2,000 devices, and latency p50/p95/p99 by range. Every cold day repeats the same generated day
shifted in time (the bytes and the read paths are those of a distinct day; generating 75
distinct days would take longer than writing them).

``--keep`` leaves the whole dataset in ``--dir`` (the cluster stopped, the cold files, and
dataset.json saying what they hold); ``--reads-only`` then measures only the reads on it, in a
fresh process, without writing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from config.settings import PROJECT_ROOT, Settings
from db.cold import FILE_SCHEMA, file_sha256, parquet_writer, write_row_groups
from db.partitions import ensure_partitions, partition_name

MINUTES = 1440
_US = 1_000_000
_NETWORKS = ["wifi", "wifi", "wifi", "cellular", "cellular", "ethernet"]
_VERSIONS = ["2.3.9", "2.4.0", "2.4.1"]
_OS_VERSIONS = ["13", "14", "15"]
_DAY: dict[str, Any] = {}  # the generated day, shared with the writer processes by fork


def generate_day(devices: int, seed: int = 7) -> dict[str, np.ndarray]:
    """One day of heartbeats, device-major (device 1's 1,440 rows, then device 2's ...), with
    times as microseconds after midnight. The rules are simulator/devices.py's advance()."""
    rng = np.random.default_rng(seed)
    n = devices
    phase = rng.integers(0, 60_000, n)
    battery = rng.integers(20, 101, n)
    charging = rng.random(n) < 0.2
    network = rng.integers(0, 6, n)
    signal = rng.integers(-100, -44, n)
    uptime = rng.integers(600, 30 * 86400, n)
    free = rng.integers(500, 64_000, n)
    version = rng.integers(0, len(_VERSIONS), n).astype(np.int32)
    os_version = rng.choice(np.array([0, 1, 1, 2], dtype=np.int32), n)
    shape = (MINUTES, n)
    cols = {k: np.empty(shape, dtype=t) for k, t in (
        ("sent", np.int64), ("latency", np.int64), ("battery", np.int16), ("charging", np.bool_),
        ("network", np.int8), ("signal", np.int16), ("uptime", np.int64), ("free", np.int32))}
    for m in range(MINUTES):
        jitter = rng.integers(-15_000, 15_001, n)
        cols["sent"][m] = np.clip(m * 60_000 + phase + jitter, 0, 86_399_999) * 1000  # ms precision, as devices send
        cols["latency"][m] = (rng.exponential(4000, n) + 800).astype(np.int64)  # received - sent, µs
        step_up = rng.integers(1, 4, n)
        drop = rng.random(n) < 0.4
        new_battery = np.where(charging, np.minimum(100, battery + step_up), np.maximum(0, battery - drop))
        stop = charging & ((new_battery >= 100) | (rng.random(n) < 0.03))
        start = ~charging & (((new_battery < 15) & (rng.random(n) < 0.3)) | (rng.random(n) < 0.005))
        charging = np.where(charging, ~stop, start)
        battery = new_battery
        network = np.where(rng.random(n) < 0.05, rng.integers(0, 6, n), network)
        signal = np.clip(signal + rng.integers(-4, 5, n), -130, -30)
        uptime = np.where(rng.random(n) < 0.0005, rng.integers(30, 300, n), uptime + 60)
        free = np.maximum(0, free + rng.integers(-20, 16, n))
        cols["battery"][m], cols["charging"][m], cols["network"][m] = battery, charging, network
        cols["signal"][m], cols["uptime"][m], cols["free"][m] = signal, uptime, free
    flat = {k: np.ascontiguousarray(v.T).reshape(-1) for k, v in cols.items()}
    flat["device_id"] = np.repeat(np.arange(1, n + 1, dtype=np.int64), MINUTES)
    flat["bucket"] = flat["sent"] // (10 * _US) * (10 * _US)
    flat["version"] = np.repeat(version, MINUTES)
    flat["os_version"] = np.repeat(os_version, MINUTES)
    return flat


def _strings(indices: np.ndarray, values: list[str]) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(indices), pa.array(values)).cast(pa.string())


def day_batch(day: date, first_device: int = 1, last_device: int | None = None) -> pa.RecordBatch:
    """The generated day as a FILE_SCHEMA batch dated ``day`` (devices in [first, last])."""
    g = _DAY
    lo = (first_device - 1) * MINUTES
    hi = len(g["device_id"]) if last_device is None else last_device * MINUTES
    base = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * _US
    ts = pa.timestamp("us", tz="UTC")
    network = g["network"][lo:hi]
    latency = g["latency"][lo:hi]
    arrays = [
        pa.array(g["device_id"][lo:hi]),
        pa.array(g["bucket"][lo:hi] + base).cast(ts),
        pa.array(g["sent"][lo:hi] + base).cast(ts),
        pa.array(latency),  # received_after_sent_us
        pa.array(np.round(latency / _US, 3).astype(np.float32)),  # clock_skew_s as the API rounds it
        pa.array(g["battery"][lo:hi]),
        pa.array(g["charging"][lo:hi]),
        _strings(network.astype(np.int32), _NETWORKS),
        pa.array(g["signal"][lo:hi], mask=network == 5),  # no signal on ethernet
        _strings(g["version"][lo:hi], _VERSIONS),
        _strings(g["os_version"][lo:hi], _OS_VERSIONS),
        pa.array(g["uptime"][lo:hi]),
        pa.array(g["free"][lo:hi]),
        pa.nulls(hi - lo, pa.string()),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=FILE_SCHEMA)


def write_cold_day(day: date, archive_dir: Path, reuse: bool = False) -> dict[str, Any]:
    """Write one cold day file as nightly would (or, with ``reuse``, take the one a --keep run
    left); its size, SHA-256, rows and seconds."""
    started = time.perf_counter()
    path = archive_dir / f"{partition_name(day)}.parquet"
    if reuse and path.exists():
        import pyarrow.parquet as pq

        sha, size = file_sha256(path)
        return {"day": day, "path": str(path), "rows": pq.ParquetFile(path).metadata.num_rows, "sha256": sha,
                "bytes": size, "seconds": time.perf_counter() - started}
    writer = parquet_writer(path)
    try:
        rows = write_row_groups(writer, [day_batch(day)])
    finally:
        writer.close()
    sha, size = file_sha256(path)
    return {"day": day, "path": str(path), "rows": rows, "sha256": sha, "bytes": size,
            "seconds": time.perf_counter() - started}


def percentiles(samples: list[float]) -> str:
    """p50 / p95 / p99 (ms) of a list of milliseconds."""
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return f"{at(0.50):7.1f} {at(0.95):7.1f} {at(0.99):7.1f}"


DATASET = "dataset.json"
Reads = tuple[str, list[float], float, list[float]]  # label, ms, rows per answer, ms in ColdReader.read


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def read_ranges(meta: dict[str, Any], cold_days: int) -> list[tuple[str, datetime, datetime, int, str, int]]:
    """(label, since, until, limit, order, devices to pick from) of each measured range."""
    today = date.fromisoformat(meta["today"])
    days, hot_devices, devices = meta["days"], meta["hot_devices"], meta["devices"]
    nightly_day = today - timedelta(days=meta["hot_days"] + 1)
    tomorrow = _midnight(today + timedelta(days=1))
    oldest = _midnight(today - timedelta(days=days - 1))
    cold_one = today - timedelta(days=days // 3)
    cold_end = _midnight(nightly_day + timedelta(1))
    return [
        ("hot, one day (yesterday), limit 1440", _midnight(today - timedelta(days=1)), _midnight(today), 1440,
         "desc", hot_devices),
        (f"cold, one day ({(today - cold_one).days} days ago), limit 1440", _midnight(cold_one),
         _midnight(cold_one + timedelta(days=1)), 1440, "desc", devices),
        (f"{days} days, newest first, limit 1000", oldest, tomorrow, 1000, "desc", hot_devices),
        (f"{days} days, oldest first, limit 1000", oldest, tomorrow, 1000, "asc", hot_devices),
        (f"{cold_days} cold days, newest first, limit 10000", oldest, cold_end, 10_000, "desc", devices),
        (f"{cold_days} cold days, oldest first, limit 10000", oldest, cold_end, 10_000, "asc", devices),
    ]


def measure_reads(
    settings: Settings, engine: Any, meta: dict[str, Any], reads: int,
) -> tuple[list[Reads], list[tuple[str, float]]] | None:
    """Latencies (ms) of GET /v1/devices/<id>/heartbeats through the app in this process, by
    range: ``reads`` requests each (a tenth of that for the 10,000-row pages), random devices.
    Before them, one request per range whose time includes the process's first look at the
    files it opens (their full SHA-256), reported apart. None when a read fails."""
    from api.app import create_app
    from db.cold import list_cold_days

    app = create_app(settings, engine=engine)
    client = app.test_client()
    headers = {"x-admin": settings.admin_key}
    reader = app.extensions["nexmdm"].cold
    cold_ms: list[float] = []  # time inside ColdReader.read (DuckDB and the rows as Python), per request
    read_cold = reader.read

    def timed_read(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        t = time.perf_counter()
        try:
            return read_cold(*args, **kwargs)
        finally:
            cold_ms.append((time.perf_counter() - t) * 1000)

    reader.read = timed_read
    with engine.connect() as conn:
        cold_days = len(list_cold_days(conn, datetime(1970, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(days=2)))
        conn.rollback()
    rng = random.Random(11)
    results: list[Reads] = []
    first_reads: list[tuple[str, float]] = []
    for label, since, until, limit, order, pick in read_ranges(meta, cold_days):
        samples: list[float] = []
        cold_parts: list[float] = []
        rows = 0
        count = reads if limit <= 1440 else max(10, reads // 10)
        for i in range(count + 1):
            # The first request: the last device, which has no rows in the nightly day (it holds
            # the first --nightly-devices only), so it opens every file any later one may open.
            device = pick if i == 0 else rng.randint(1, pick)
            cold_before = len(cold_ms)
            t = time.perf_counter()
            answer = client.get(f"/v1/devices/{device}/heartbeats", headers=headers, query_string={
                "since": since.isoformat(), "until": until.isoformat(), "limit": limit, "order": order})
            elapsed = (time.perf_counter() - t) * 1000
            in_cold = sum(cold_ms[cold_before:])
            if answer.status_code != 200:
                print(f"  read FAILED: {answer.status_code} {answer.get_data(as_text=True)[:300]}")
                return None
            if i == 0:
                first_reads.append((label, elapsed))
                continue
            samples.append(elapsed)
            cold_parts.append(in_cold)
            rows += len(answer.get_json()["heartbeats"])
        results.append((label, samples, rows / count, cold_parts))
    return results, first_reads


def print_reads(results: list[Reads], first_reads: list[tuple[str, float]], reads: int,
                days: int) -> None:
    """The latency table and the verdict on the two read targets."""
    print(f"  first request of each range in this process (includes the SHA-256 of each file it opens "
          f"for the first time): {', '.join(f'{ms:.0f}' for _, ms in first_reads)} ms")
    print(f"  history reads (GET /v1/devices/<id>/heartbeats in-process, random device; {reads} each, "
          f"{max(10, reads // 10)} for the 10000-row pages): ms")
    print(f"    {'range':<48} {'p50':>7} {'p95':>7} {'p99':>7}  rows/answer  ColdReader.read p50")
    for label, samples, rows, cold_parts in results:
        print(f"    {label:<48} {percentiles(samples)}  {rows:>11,.0f}  {statistics.median(cold_parts):18.1f}")
    cold_day_p95 = sorted(results[1][1])[int(0.95 * len(results[1][1]))]
    wide_p95 = max(sorted(r[1])[int(0.95 * len(r[1]))] for r in results[2:4])
    print(f"  targets: one cold day p95 < 50 ms: {'MET' if cold_day_p95 < 50 else 'NOT MET'} ({cold_day_p95:.1f}); "
          f"{days} days p95 < 200 ms: {'MET' if wide_p95 < 200 else 'NOT MET'} ({wide_p95:.1f})")


def reads_only(var_dir: Path, reads: int) -> int:
    """``--reads-only``: start the kept cluster, measure the reads, stop it; nothing is written."""
    from db.embedded import EmbeddedCluster
    from db.engine import make_engine
    from db.migrate import upgrade

    meta = json.loads((var_dir / DATASET).read_text())
    started = time.perf_counter()
    cluster = EmbeddedCluster(var_dir / "pg")
    print(f"bench-storage --reads-only: the dataset in {var_dir} ({meta['devices']:,} devices x {meta['days']} days, "
          f"made {meta['made_at']}: {meta['cold_files']} cold day files, {meta['cold_rows']:,} heartbeats)", flush=True)
    url = cluster.start()
    try:
        upgrade(url)
        settings = Settings(database_url=url, admin_key="bench-storage-key", var_dir=var_dir,
                            archive_dir=var_dir / "archive", hot_days=meta["hot_days"], retention_days=meta["days"],
                            scheduler_enabled=False, db_pool_size=4, db_max_overflow=2)
        engine = make_engine(settings, url)
        try:
            outcome = measure_reads(settings, engine, meta, reads)
        finally:
            engine.dispose()
    finally:
        cluster.stop()
    if outcome is None:
        return 1
    print(f"  machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end "
          "(shared with other work when above the cores)")
    print_reads(*outcome, reads, meta["days"])
    print(f"  ({time.perf_counter() - started:.0f} s in all)")
    return 0


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0915 — one linear script
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=90, help="days of history (hot + cold)")
    parser.add_argument("--hot-days", type=int, default=14)
    parser.add_argument("--hot-devices", type=int, default=200, help="devices with hot days in PostgreSQL")
    parser.add_argument("--nightly-devices", type=int, default=2_000, help="devices in the day nightly archives")
    parser.add_argument("--reads", type=int, default=200, help="requests per range")
    parser.add_argument("--writers", type=int, default=2, help="processes writing cold days")
    parser.add_argument("--keep", action="store_true",
                        help="keep the dataset afterwards (cold files, stopped cluster, dataset.json)")
    parser.add_argument("--reuse", action="store_true", help="take the cold files a --keep run left")
    parser.add_argument("--reads-only", action="store_true",
                        help="only the reads, on the dataset a --keep run left in --dir (~20 s; changes nothing)")
    parser.add_argument("--dir", type=Path, default=PROJECT_ROOT / "var" / "bench-storage",
                        help="where the cluster, the cold files and dataset.json live (default var/bench-storage)")
    args = parser.parse_args(argv)
    if not 0 < args.hot_devices <= args.nightly_devices <= args.devices or args.days <= args.hot_days + 2:
        parser.error("need 0 < hot-devices <= nightly-devices <= devices and days > hot-days + 2")
    var_dir = args.dir.resolve()
    if args.reads_only:
        if not (var_dir / DATASET).exists():
            parser.error(f"--reads-only needs the dataset a --keep run leaves: no {var_dir / DATASET}")
        return reads_only(var_dir, args.reads)

    from db.embedded import EmbeddedCluster
    from db.engine import make_engine
    from db.migrate import upgrade

    archive_dir = var_dir / "archive"
    (var_dir / DATASET).unlink(missing_ok=True)  # describes a finished --keep run only
    if not args.reuse:
        shutil.rmtree(archive_dir, ignore_errors=True)
    archive_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*archive_dir.glob("*.json"), *archive_dir.glob(".*.tmp")]:
        stale.unlink()
    cluster = EmbeddedCluster(var_dir / "pg")
    print(f"bench-storage: {args.devices:,} devices x {args.days} days, HOT_DAYS={args.hot_days}; "
          f"PostgreSQL and files under {var_dir}", flush=True)
    url = cluster.start()
    cluster.recreate_database()
    upgrade(url)
    settings = Settings(database_url=url, admin_key="bench-storage-key", var_dir=var_dir, archive_dir=archive_dir,
                        hot_days=args.hot_days, retention_days=args.days, scheduler_enabled=False,
                        db_pool_size=4, db_max_overflow=2, db_statement_timeout_ms=600_000)
    engine = make_engine(settings, url)
    today = datetime.now(UTC).date()
    nightly_day = today - timedelta(days=args.hot_days + 1)
    cold_days = [today - timedelta(days=n) for n in range(args.hot_days + 2, args.days)]
    hot_days = [today - timedelta(days=n) for n in range(0, args.hot_days + 2)]
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO devices (id, device_uid, token_hash) SELECT g, 'bench-' || g, sha256(g::text::bytea) "
                "FROM generate_series(1, %(n)s) g", {"n": args.devices})
            conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence('devices', 'id'), %(n)s)", {"n": args.devices})

        t0 = time.perf_counter()
        _DAY.update(generate_day(args.devices))
        print(f"  generated one day of {args.devices * MINUTES:,} heartbeats in {time.perf_counter() - t0:.1f} s",
              flush=True)

        # ---- cold tier: as nightly leaves it ----
        t0 = time.perf_counter()
        import multiprocessing

        with ProcessPoolExecutor(args.writers, mp_context=multiprocessing.get_context("fork")) as pool:
            written = list(pool.map(write_cold_day, cold_days, [archive_dir] * len(cold_days),
                                    [args.reuse] * len(cold_days)))
        cold_wall = time.perf_counter() - t0
        cold_rows = sum(w["rows"] for w in written)
        cold_bytes = sum(w["bytes"] for w in written)
        with engine.begin() as conn:
            for w in written:
                start = datetime(w["day"].year, w["day"].month, w["day"].day, tzinfo=UTC)
                conn.exec_driver_sql(
                    "INSERT INTO hb_partitions (name, range_start, range_end, state, row_count, archive_path, sha256, "
                    "archived_at, archive_format, archive_bytes) VALUES (%(n)s, %(s)s, %(e)s, 'archived', %(r)s, "
                    "%(p)s, %(h)s, now(), 'parquet', %(b)s)",
                    {"n": partition_name(w["day"]), "s": start, "e": start + timedelta(days=1), "r": w["rows"],
                     "p": w["path"], "h": w["sha256"], "b": w["bytes"]})
        how = "taken from a --keep run (hashed)" if args.reuse else "written"
        print(f"  cold: {len(written)} day files, {cold_rows:,} heartbeats, {cold_bytes / 1e9:.2f} GB {how} in "
              f"{cold_wall:.0f} s ({args.writers} processes)", flush=True)

        # ---- hot tier: the generated rows loaded with the restore path's COPY ----
        from scheduler.jobs.cold_export import copy_from_parquet

        t0 = time.perf_counter()
        raw = engine.raw_connection()
        try:
            with raw.cursor() as cur:
                cur.execute("SET statement_timeout = 0")  # a bulk load, not a request
            for day in hot_days:
                last = args.nightly_devices if day == nightly_day else args.hot_devices
                path = var_dir / "load.parquet"
                writer = parquet_writer(path)
                write_row_groups(writer, [day_batch(day, 1, last)])
                writer.close()
                with engine.begin() as conn:
                    ensure_partitions(conn, day, 0)
                with raw.cursor() as cur:
                    copy_from_parquet(cur, path, partition_name(day))
                    cur.execute(f"ANALYZE {partition_name(day)}")
                raw.commit()
                path.unlink()
        finally:
            raw.close()
        with engine.connect() as conn:
            hot = conn.exec_driver_sql(
                "SELECT sum(pg_total_relation_size(c.oid)), sum(c.reltuples)::bigint FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'heartbeats'::regclass "
                "AND c.relname <> %(n)s AND c.reltuples > 0", {"n": partition_name(nightly_day)}).one()
            conn.rollback()
        hot_bytes, hot_rows = int(hot[0]), int(hot[1])
        print(f"  hot: {len(hot_days)} days in PostgreSQL ({hot_rows:,} heartbeats of {args.hot_devices:,} devices, "
              f"the nightly day {args.nightly_devices:,}) loaded in {time.perf_counter() - t0:.0f} s", flush=True)

        # ---- nightly: the real job on one day ----
        from scheduler.service import run_job

        nightly_rows = args.nightly_devices * MINUTES
        report = run_job("nightly", engine, settings, trigger="bench", progress=lambda line: None)
        if report.status != "succeeded":
            print(f"  nightly FAILED: {report.error} {report.detail}")
            return 1
        [archived] = report.detail["archived"]
        nightly_bytes = archived["bytes"]

        # ---- reads through the app ----
        meta = {"devices": args.devices, "days": args.days, "hot_days": args.hot_days,
                "hot_devices": args.hot_devices, "nightly_devices": args.nightly_devices,
                "today": today.isoformat(), "cold_files": len(written), "cold_rows": cold_rows,
                "cold_bytes": cold_bytes, "made_at": datetime.now(UTC).isoformat(timespec="seconds")}
        outcome = measure_reads(settings, engine, meta, args.reads)
        if outcome is None:
            return 1
        results, first_reads = outcome
    finally:
        engine.dispose()
        cluster.stop()
        if not args.keep:
            shutil.rmtree(archive_dir, ignore_errors=True)
    if args.keep:
        (var_dir / DATASET).write_text(json.dumps(meta, indent=1))

    hot_per = hot_bytes / hot_rows
    cold_per = cold_bytes / cold_rows
    nightly_per = nightly_bytes / nightly_rows
    month = 2_000 * MINUTES * 30.44
    print()
    print(f"  machine: {os.cpu_count()} cores, shared with other work while this ran: figures as measured")
    print("  bytes per heartbeat")
    print(f"    hot  (PostgreSQL, table + primary key)   {hot_per:8.1f}   ({hot_rows:,} heartbeats)")
    print(f"    cold (Parquet, {len(written)} generated days)         {cold_per:8.2f}   ({cold_rows:,} heartbeats)"
          f"   target <= 15: {'MET' if cold_per <= 15 else 'NOT MET'}")
    print(f"    cold (Parquet, the day nightly exported)  {nightly_per:8.2f}   ({nightly_rows:,} heartbeats)")
    print(f"  nightly: {nightly_rows:,} rows exported, verified, dropped in {report.duration_s:.1f} s = "
          f"{report.duration_s / (nightly_rows / 1e6):.1f} s per million rows")
    growth = month * max(cold_per, nightly_per) / 1e9
    steady_hot = 2_000 * MINUTES * args.hot_days * hot_per / 1e9
    print(f"  at 2,000 devices: storage grows {growth:.2f} GB a month (cold tier; target <= 1 GB: "
          f"{'MET' if growth <= 1 else 'NOT MET'}; all in PostgreSQL it would be {month * hot_per / 1e9:.1f} GB); "
          f"the hot {args.hot_days} days hold a steady {steady_hot:.1f} GB")
    print_reads(results, first_reads, args.reads, args.days)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
