"""A day partition to Parquet and back: the nightly export (in the child process), its
read-back verification against the source, and the restore load.

Export: one REPEATABLE READ snapshot sees the partition's count and checksums, streams the
rows with COPY (CSV, timestamps as epoch microseconds) through a pipe into pyarrow's CSV
reader and out as row groups of the cold tier's layout (db/cold.py). The file is then read
back in full: its row count and column sums must equal the snapshot's, and a random sample of
rows must equal the same rows fetched from PostgreSQL, column for column. Only then is it
kept; the caller writes the manifest and the parent drops the partition.
"""

from __future__ import annotations

import io
import os
import random
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa

from db.cold import (
    ARROW_SCHEMA,
    FILE_SCHEMA,
    ColdFileCorrupt,
    parquet_writer,
    to_heartbeat_batch,
    write_row_groups,
)
from db.heartbeats import COLUMNS
from scheduler.locking import Progress

_TIMESTAMPS = ("bucket_ts", "sent_at", "received_at")
_CHUNK = 1 << 20
ROW_BATCH = 65_536
_json = msgspec.json.Decoder()


class ExportMismatch(Exception):
    """The Parquet file read back differs from the partition it was written from."""


@dataclass(frozen=True)
class Checksums:
    """Count and column sums of a day's rows (timestamps as microseconds after the day's start)."""

    rows: int
    device_id_sum: int
    bucket_us_sum: int
    received_us_sum: int
    battery_sum: int


def _export_select(name: str) -> str:
    cols = []
    for c in (*COLUMNS, "extra"):
        if c == "received_at":  # the file's received_after_sent_us
            cols.append("(extract(epoch FROM received_at - sent_at) * 1000000)::int8")
        elif c in _TIMESTAMPS:
            cols.append(f"(extract(epoch FROM {c}) * 1000000)::int8")
        elif c == "extra":
            cols.append("extra::text")
        else:
            cols.append(c)
    return f'SELECT {", ".join(cols)} FROM "{name}" ORDER BY device_id, bucket_ts'


def source_checksums(cur: Any, name: str, day: date) -> Checksums:
    """The partition's Checksums, in the caller's snapshot."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    cur.execute(
        f"""
        SELECT count(*), COALESCE(sum(device_id), 0),
               COALESCE(sum((extract(epoch FROM bucket_ts - %(s)s) * 1000000)::int8), 0),
               COALESCE(sum((extract(epoch FROM received_at - %(s)s) * 1000000)::int8), 0),
               COALESCE(sum(battery_pct), 0)
        FROM "{name}"
        """,
        {"s": start},
    )
    return Checksums(*(int(v) for v in cur.fetchone()))


def _csv_batches(fh: Any) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pcsv

    types = {c: pa.int64() if c in _TIMESTAMPS else FILE_SCHEMA.field(c).type for c in FILE_SCHEMA.names}
    try:
        reader = pcsv.open_csv(
            fh,
            read_options=pcsv.ReadOptions(column_names=FILE_SCHEMA.names, block_size=8 << 20, use_threads=False),
            convert_options=pcsv.ConvertOptions(
                column_types=types, true_values=["t"], false_values=["f"], null_values=[""],
                strings_can_be_null=True, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):  # a day without heartbeats: a file of no row groups
            return
        raise
    for batch in reader:
        arrays = [batch.column(i).cast(FILE_SCHEMA.field(i).type) if name in _TIMESTAMPS else batch.column(i)
                  for i, name in enumerate(FILE_SCHEMA.names)]
        yield pa.RecordBatch.from_arrays(arrays, schema=FILE_SCHEMA)


def copy_to_parquet(conn: Any, name: str, path: Path, progress: Progress) -> int:
    """COPY the partition (in the connection's transaction) into a Parquet file; rows written.
    COPY writes into a pipe from a thread; pyarrow reads the other end as it fills."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as sink, conn.cursor() as cur:
                cur.copy_expert(f"COPY ({_export_select(name)}) TO STDOUT WITH (FORMAT csv)", sink, size=_CHUNK)
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)

    producer = threading.Thread(target=produce, name=f"copy-{name}", daemon=True)
    producer.start()
    written = 0
    source = os.fdopen(read_fd, "rb")
    try:
        writer = parquet_writer(path)
        try:
            def counted() -> Iterator[pa.RecordBatch]:
                nonlocal written
                for batch in _csv_batches(source):
                    written += batch.num_rows
                    if written // 5_000_000 != (written - batch.num_rows) // 5_000_000:
                        progress(f"{name}: {written:,} rows written to Parquet")
                    yield batch
            write_row_groups(writer, counted())
        finally:
            writer.close()
    except BaseException:
        source.close()  # unblocks the producer (EPIPE) before we wait for it
        producer.join()
        if failure:
            raise failure[0] from None
        raise
    source.close()
    producer.join()
    if failure:
        raise failure[0]
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    return written


def _f32(value: float | None) -> float | None:
    return None if value is None else struct.unpack("f", struct.pack("f", value))[0]


def _normal(row: dict[str, Any], extra_is_text: bool) -> dict[str, Any]:
    """A row with float4 rounded to its 32 bits and, from the file, extra parsed (the driver
    parses jsonb already; a JSON string value must not be parsed twice)."""
    out = dict(row)
    out["clock_skew_s"] = _f32(out["clock_skew_s"])
    if extra_is_text and out["extra"] is not None:
        out["extra"] = _json.decode(out["extra"])
    return out


def read_back(path: Path, day: date, sample_rows: int, seed: int | None = None) -> tuple[Checksums, list[dict]]:
    """Decode the whole file (page checksums on): its Checksums and a random sample of rows."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    start_us = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 1_000_000
    try:
        pf = pq.ParquetFile(str(path), page_checksum_verification=True)
        total = pf.metadata.num_rows
        rng = random.Random(seed)
        wanted = sorted(rng.sample(range(total), min(sample_rows, total)))
        sums = [0, 0, 0, 0, 0]
        sample: list[dict] = []
        offset = 0
        w = 0
        for stored in pf.iter_batches(batch_size=ROW_BATCH):
            batch = to_heartbeat_batch(stored)
            n = batch.num_rows
            sums[0] += n
            sums[1] += pc.sum(batch.column("device_id")).as_py() or 0
            for k, col in ((2, "bucket_ts"), (3, "received_at")):
                us = pc.subtract(batch.column(col).cast(pa.int64()), start_us)
                sums[k] += pc.sum(us).as_py() or 0
            sums[4] += pc.sum(batch.column("battery_pct").cast(pa.int64())).as_py() or 0
            while w < len(wanted) and wanted[w] < offset + n:
                sample.append(batch.slice(wanted[w] - offset, 1).to_pylist()[0])
                w += 1
            offset += n
    except (OSError, pa.ArrowException) as exc:
        raise ColdFileCorrupt(path, f"unreadable: {exc}") from None
    return Checksums(*sums), sample



def source_rows(cur: Any, name: str, keys: list[tuple[int, datetime]]) -> dict[tuple[int, datetime], dict]:
    """The partition's rows with these (device_id, bucket_ts) keys, by key."""
    if not keys:
        return {}
    cols = (*COLUMNS, "extra")
    cur.execute(
        f'SELECT {", ".join(cols)} FROM "{name}" WHERE (device_id, bucket_ts) IN '
        f"(SELECT * FROM unnest(%(ids)s::bigint[], %(ts)s::timestamptz[]))",
        {"ids": [k[0] for k in keys], "ts": [k[1] for k in keys]},
    )
    return {(r[0], r[1]): dict(zip(cols, r, strict=True)) for r in cur.fetchall()}


def verify_against_source(cur: Any, name: str, day: date, path: Path, expected: Checksums,
                          sample_rows: int) -> None:
    """Read the file back: count and sums equal to the source's, sampled rows equal; else ExportMismatch."""
    got, sample = read_back(path, day, sample_rows)
    if got != expected:
        raise ExportMismatch(f"{path.name} read back as {got}, the partition has {expected}")
    source = source_rows(cur, name, [(r["device_id"], r["bucket_ts"]) for r in sample])
    for row in sample:
        original = source.get((row["device_id"], row["bucket_ts"]))
        if original is None or _normal(original, extra_is_text=False) != _normal(row, extra_is_text=True):
            raise ExportMismatch(f"{path.name}: row ({row['device_id']}, {row['bucket_ts']}) reads back as {row}, "
                                 f"the partition has {original}")


class _CsvFromParquet(io.RawIOBase):
    """A readable stream of CSV text of a Parquet file's rows (what COPY FROM reads)."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self._batches = pq.ParquetFile(str(path), page_checksum_verification=True).iter_batches(ROW_BATCH)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        import pyarrow.csv as pcsv

        while len(self._buf) < max(size, 1):
            stored = next(self._batches, None)
            if stored is None:
                break
            batch = to_heartbeat_batch(stored)
            out = io.BytesIO()
            pcsv.write_csv(batch, out, pcsv.WriteOptions(include_header=False))
            self._buf += out.getvalue()
        if size < 0:
            size = len(self._buf)
        chunk, self._buf = self._buf[:size], self._buf[size:]
        return chunk


def copy_from_parquet(cur: Any, path: Path, table: str) -> int:
    """COPY a Parquet day file into ``table``; rows loaded."""
    cols = ", ".join(ARROW_SCHEMA.names)
    cur.copy_expert(f'COPY "{table}" ({cols}) FROM STDIN WITH (FORMAT csv)', _CsvFromParquet(path), size=_CHUNK)
    return cur.rowcount


def parquet_rows(path: Path) -> int:
    """Rows in a Parquet day file, every page decoded (a damaged page raises ColdFileCorrupt)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path), page_checksum_verification=True)
        return sum(batch.num_rows for batch in pf.iter_batches(ROW_BATCH))
    except (OSError, pa.ArrowException) as exc:
        raise ColdFileCorrupt(path, f"unreadable: {exc}") from None

