"""The cold tier: each archived day of heartbeats as one Parquet file, read with DuckDB.

A day's file holds the partition's rows sorted by device, then time, in row groups of
``ROW_GROUP_ROWS`` (about 45 device-days at one heartbeat a minute), so the min/max statistics
of ``device_id`` let a reader skip every row group but one or two. Timestamps are delta-encoded,
the float byte-split, small repeating values dictionary-encoded, all of it zstd; ``received_at``
is stored as microseconds after ``sent_at`` (a few thousand, where the absolute time costs ~3.5
bytes a row). About 10 bytes per heartbeat against ~150 in PostgreSQL (``make bench-storage``).

Reads never trust a file blindly: its size must be the manifest's, and the first time a
process meets a file (or the file's inode, size or mtime changed since) its SHA-256 is
checked in full; a file that fails is refused with ``ColdFileCorrupt``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa

from db.errors import DataError
from db.heartbeats import COLUMNS

PARQUET_FORMAT = "parquet"
ROW_GROUP_ROWS = 65_536
ZSTD_LEVEL = 3
_TS = pa.timestamp("us", tz="UTC")
# One definition of the file's columns, in db.heartbeats.COLUMNS order (plus extra, as JSON text).
_ARROW_TYPES: dict[str, pa.DataType] = {
    "device_id": pa.int64(), "bucket_ts": _TS, "sent_at": _TS, "received_at": _TS,
    "clock_skew_s": pa.float32(), "battery_pct": pa.int16(), "charging": pa.bool_(),
    "network_type": pa.string(), "signal_dbm": pa.int16(), "app_version": pa.string(),
    "os_version": pa.string(), "uptime_s": pa.int64(), "free_storage_mb": pa.int32(), "extra": pa.string(),
}
# The heartbeat as PostgreSQL holds it (db.heartbeats.COLUMNS, plus extra as JSON text) ...
ARROW_SCHEMA = pa.schema([pa.field(c, _ARROW_TYPES[c], nullable=c in ("signal_dbm", "extra"))
                          for c in (*COLUMNS, "extra")])
# ... and as the file stores it: received_at as microseconds after sent_at.
RECEIVED_OFFSET = "received_after_sent_us"
FILE_SCHEMA = ARROW_SCHEMA.set(ARROW_SCHEMA.get_field_index("received_at"),
                               pa.field(RECEIVED_OFFSET, pa.int64(), nullable=False))
# Delta encoding for values that move a little from row to row (sorted by device, then time);
# byte-split for the float; dictionaries for the few distinct values of the rest.
_ENCODINGS = {"bucket_ts": "DELTA_BINARY_PACKED", "sent_at": "DELTA_BINARY_PACKED",
              RECEIVED_OFFSET: "DELTA_BINARY_PACKED", "uptime_s": "DELTA_BINARY_PACKED",
              "free_storage_mb": "DELTA_BINARY_PACKED", "clock_skew_s": "BYTE_STREAM_SPLIT"}
_DICTIONARY = [c for c in FILE_SCHEMA.names if c not in _ENCODINGS and c != "extra"]
_RECEIVED = ARROW_SCHEMA.get_field_index("received_at")
_CHUNK = 1 << 20


class ColdFileCorrupt(DataError):
    """A cold-tier file does not match what its manifest recorded (changed, truncated, unreadable)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"archive file {Path(path).name} refused: {reason}")
        self.path = str(path)
        self.reason = reason


def to_file_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch of ARROW_SCHEMA as the file stores it (FILE_SCHEMA)."""
    import pyarrow.compute as pc

    offset = pc.subtract(batch.column(_RECEIVED).cast(pa.int64()), batch.column("sent_at").cast(pa.int64()))
    columns = list(batch.columns)
    columns[_RECEIVED] = offset
    return pa.RecordBatch.from_arrays(columns, schema=FILE_SCHEMA)


def to_heartbeat_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch read from a file (FILE_SCHEMA) as the heartbeat (ARROW_SCHEMA)."""
    import pyarrow.compute as pc

    received = pc.add(batch.column("sent_at").cast(pa.int64()), batch.column(RECEIVED_OFFSET)).cast(_TS)
    columns = list(batch.columns)
    columns[_RECEIVED] = received
    return pa.RecordBatch.from_arrays(columns, schema=ARROW_SCHEMA)


def parquet_writer(path: Path | str) -> Any:
    """A pyarrow ParquetWriter with the cold tier's file schema, encodings and compression."""
    import pyarrow.parquet as pq

    return pq.ParquetWriter(
        str(path), FILE_SCHEMA, compression="zstd", compression_level=ZSTD_LEVEL,
        use_dictionary=_DICTIONARY, column_encoding=_ENCODINGS, write_statistics=True,
        write_page_checksum=True, store_schema=False,
    )


def write_row_groups(writer: Any, batches: Iterable[pa.RecordBatch]) -> int:
    """Write FILE_SCHEMA batches (already in device, time order) as row groups of exactly
    ROW_GROUP_ROWS (the last one shorter); returns the rows written."""
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    written = 0
    for batch in batches:
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= ROW_GROUP_ROWS:
            table = pa.Table.from_batches(pending, schema=FILE_SCHEMA)
            writer.write_table(table.slice(0, ROW_GROUP_ROWS), row_group_size=ROW_GROUP_ROWS)
            rest = table.slice(ROW_GROUP_ROWS)
            pending = rest.to_batches()
            pending_rows = rest.num_rows
            written += ROW_GROUP_ROWS
    if pending_rows:
        writer.write_table(pa.Table.from_batches(pending, schema=FILE_SCHEMA), row_group_size=ROW_GROUP_ROWS)
        written += pending_rows
    return written


def file_sha256(path: Path) -> tuple[str, int]:
    """(SHA-256 hex, size in bytes) of a file, streamed."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def regular_file_in(directory: Path, name: str) -> Path:
    """``directory/name`` when it is a regular file (not a symlink) directly inside ``directory``;
    ColdFileCorrupt otherwise."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise ColdFileCorrupt(name, "the file name must not contain a path")
    path = Path(directory) / name
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise ColdFileCorrupt(path, "the file is missing") from None
    if not stat.S_ISREG(mode):
        raise ColdFileCorrupt(path, "not a regular file (a symlink or something else)")
    return path


# ---- which days are cold --------------------------------------------------------------------


@dataclass(frozen=True)
class ColdDay:
    """A day whose heartbeats live in a Parquet file (hb_partitions state 'archived')."""

    day: date
    file: str
    sha256: str
    size_bytes: int
    row_count: int

    @property
    def range_start(self) -> datetime:
        return datetime(self.day.year, self.day.month, self.day.day, tzinfo=UTC)

    @property
    def range_end(self) -> datetime:
        return self.range_start + timedelta(days=1)


def list_cold_days(conn: Any, since: datetime, until: datetime) -> list[ColdDay]:
    """Days archived as Parquet whose range meets [since, until), oldest first."""
    rows = conn.exec_driver_sql(
        """
        SELECT range_start, archive_path, sha256, archive_bytes, row_count FROM hb_partitions
        WHERE state = 'archived' AND archive_format = 'parquet'
          AND range_end > %(since)s AND range_start < %(until)s
        ORDER BY range_start
        """,
        {"since": since, "until": until},
    ).fetchall()
    return [ColdDay(start.astimezone(UTC).date(), Path(path).name, sha, int(size), int(count))
            for start, path, sha, size, count in rows]


# ---- reading --------------------------------------------------------------------------------


def _select_column(name: str) -> str:
    if name == "received_at":
        return f"sent_at + to_microseconds({RECEIVED_OFFSET}) AS received_at"
    # float4 as PostgreSQL prints it (the shortest text that round-trips), not widened to double
    return "CAST(clock_skew_s AS VARCHAR) AS clock_skew_s" if name == "clock_skew_s" else name


_SELECT = ", ".join(_select_column(c) for c in ARROW_SCHEMA.names)
_READ_SQL = (f"SELECT {_SELECT} FROM read_parquet(?) WHERE device_id = ? "
             "AND bucket_ts >= ? AND bucket_ts < ? ORDER BY bucket_ts {direction} LIMIT ?")
_json = msgspec.json.Decoder()


def _to_records(table: pa.Table) -> list[dict[str, Any]]:
    """DuckDB's answer as the dicts PostgreSQL's driver gives for the same heartbeats."""
    for i, name in enumerate(table.column_names):
        if _ARROW_TYPES[name] == _TS:
            table = table.set_column(i, name, table.column(i).cast(_TS))  # always UTC, whatever DuckDB's zone
    rows = table.to_pylist()
    for row in rows:
        row["clock_skew_s"] = float(row["clock_skew_s"])
        if row["extra"] is not None:
            row["extra"] = _json.decode(row["extra"])
    return rows


class ColdReader:
    """Reads one device's heartbeats from the day files under ``archive_dir`` with DuckDB
    (in-process, one database per process, one cursor per thread). Thread-safe."""

    def __init__(self, archive_dir: Path, threads: int = 1, memory_limit_mb: int = 256) -> None:
        self.archive_dir = Path(archive_dir)
        self._threads = threads
        self._memory_limit_mb = memory_limit_mb
        self._db: Any = None
        self._lock = threading.Lock()
        self._verified: dict[str, tuple[int, int, int]] = {}

    def _cursor(self) -> Any:
        # One database per process (created on first use, after any fork), a cursor per read:
        # cursors share the database's Parquet metadata cache.
        import duckdb

        with self._lock:
            if self._db is None:
                db = duckdb.connect(config={
                    "threads": self._threads, "memory_limit": f"{self._memory_limit_mb}MB"})
                db.execute("SET parquet_metadata_cache = true")  # footers parsed once per file
                self._db = db
            return self._db.cursor()

    def check(self, day: ColdDay) -> Path:
        """The day's file, once it is known to match its manifest; ColdFileCorrupt otherwise.
        Size on every read; the full SHA-256 the first time (and whenever the file changed)."""
        path = regular_file_in(self.archive_dir, day.file)
        st = os.stat(path)
        if st.st_size != day.size_bytes:
            self._verified.pop(str(path), None)
            raise ColdFileCorrupt(path, f"{st.st_size} bytes where the manifest says {day.size_bytes}: "
                                        "truncated or altered")
        fingerprint = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._verified.get(str(path)) != fingerprint:
            sha, _ = file_sha256(path)
            if sha != day.sha256:
                raise ColdFileCorrupt(path, f"SHA-256 {sha} does not match the manifest's {day.sha256}: "
                                            "the file was altered")
            self._verified[str(path)] = fingerprint
        return path

    def read(
        self, device_id: int, since: datetime, until: datetime, days: Sequence[ColdDay], limit: int,
        newest_first: bool = True,
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` heartbeats of one device with since <= bucket_ts < until from the given
        days' files, newest (or oldest) first. Reads the days nearest the start of the order
        first, in growing steps, and stops once ``limit`` rows are in hand."""
        import duckdb

        ordered = sorted(days, key=lambda d: d.day, reverse=newest_first)
        sql = _READ_SQL.format(direction="DESC" if newest_first else "ASC")
        out: list[dict[str, Any]] = []
        for step in _steps(ordered):
            files = [str(self.check(d)) for d in step]
            cursor = self._cursor()
            try:
                table = cursor.sql(sql, params=[files, device_id, since, until, limit - len(out)]).to_arrow_table()
            except duckdb.Error as exc:  # a damaged page or footer that kept its size and stamps
                raise ColdFileCorrupt(", ".join(Path(f).name for f in files),
                                      f"unreadable: {str(exc).splitlines()[0]}") from None
            finally:
                cursor.close()
            out.extend(_to_records(table))
            if len(out) >= limit:
                break
        return out

    def explain(self, device_id: int, since: datetime, until: datetime, days: Sequence[ColdDay]) -> str:
        """DuckDB's plan of one read over these days (to show and test the pushed-down filters)."""
        files = [str(self.check(d)) for d in days]
        cursor = self._cursor()
        try:
            rows = cursor.execute(f"EXPLAIN {_READ_SQL.format(direction='DESC')}",
                                  [files, device_id, since, until, 1]).fetchall()
        finally:
            cursor.close()
        return "\n".join(str(r[-1]) for r in rows)

    def close(self) -> None:
        """Close the in-process database."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _steps(days: list[ColdDay]) -> Iterator[list[ColdDay]]:
    """1, 2, 4, 8 ... days at a time: a page near the start of the order touches one file."""
    i, size = 0, 1
    while i < len(days):
        yield days[i:i + size]
        i += size
        size *= 2
