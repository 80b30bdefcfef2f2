"""The cold tier: each archived day of heartbeats as one Parquet file, read with DuckDB.

A day's file holds the partition's rows sorted by device, then time, in row groups of
``ROW_GROUP_ROWS`` (about 45 device-days at one heartbeat a minute), so the min/max statistics
of ``device_id`` let a reader skip every row group but one or two; inside a row group, pages of
at most ``PAGE_ROWS`` rows and a page index let DuckDB decode only the pages that hold the
device (smaller row groups cost more: DuckDB checks each group's statistics on every query,
~5 µs a group, 1,758 groups a day at 8,192 rows). Timestamps are delta-encoded,
the float byte-split, small repeating values dictionary-encoded, all of it zstd; ``received_at``
is stored as microseconds after ``sent_at`` (a few thousand, where the absolute time costs ~3.5
bytes a row). About 10 bytes per heartbeat against ~150 in PostgreSQL (``make bench-storage``).

Reads never trust a file blindly. On every read: a regular file, the manifest's size, and a
Parquet footer (length and magic) at its end. Once per process per file: its SHA-256 in full,
remembered with the file's (device, inode, size, ctime, mtime) — any write, truncation,
replacement or ``touch`` changes the ctime, which a user cannot set back — so a file changed
after it was trusted is hashed again and refused. A file that fails is refused with
``ColdFileCorrupt``.
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
PAGE_ROWS = 8_192
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
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
        write_page_checksum=True, store_schema=False, write_page_index=True, max_rows_per_page=PAGE_ROWS,
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
    return regular_file_stat(directory, name)[0]


def regular_file_stat(directory: Path, name: str) -> tuple[Path, os.stat_result]:
    """``regular_file_in`` and the file's stat (one lstat: a regular file is never a link)."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise ColdFileCorrupt(name, "the file name must not contain a path")
    path = Path(directory) / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ColdFileCorrupt(path, "the file is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise ColdFileCorrupt(path, "not a regular file (a symlink or something else)")
    return path, st


def parquet_tail_problem(path: Path, size: int) -> str | None:
    """None when the file ends as a Parquet file does (a footer length that fits, then ``PAR1``);
    else what is wrong. One 8-byte read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, size - 8))
            tail = fh.read(8)
    except OSError as exc:
        return f"unreadable: {exc}"
    if len(tail) < 8 or tail[4:] != b"PAR1":
        return "no Parquet footer at its end (truncated or overwritten)"
    footer = int.from_bytes(tail[:4], "little")
    if not 0 < footer <= size - 12:
        return f"a footer of {footer} bytes cannot fit in {size}"
    return None


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
    """DuckDB's answer as the dicts PostgreSQL's driver gives for the same heartbeats, built a
    column at a time (numpy for whole numbers, timestamps from their microseconds) instead of
    pyarrow's value-by-value conversion."""
    names = table.column_names
    columns: list[list[Any]] = []
    for name in names:
        column = table.column(name)
        if _ARROW_TYPES[name] == _TS:  # always UTC, whatever DuckDB's zone
            micros = column.cast(_TS).cast(pa.int64()).to_numpy().tolist()
            columns.append([_EPOCH + timedelta(microseconds=m) for m in micros])
        elif name == "clock_skew_s":
            columns.append([float(v) for v in column.to_pylist()])
        elif name == "extra":
            columns.append([None if v is None else _json.decode(v) for v in column.to_pylist()])
        elif column.null_count == 0 and pa.types.is_integer(column.type):
            columns.append(column.to_numpy().tolist())
        else:
            columns.append(column.to_pylist())
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]


class ColdReader:
    """Reads one device's heartbeats from the day files under ``archive_dir`` with DuckDB:
    in-process, one database per process (opened after any fork), one connection per thread,
    kept for the next read. Thread-safe."""

    def __init__(self, archive_dir: Path, threads: int = 1, memory_limit_mb: int = 256) -> None:
        self.archive_dir = Path(archive_dir)
        self._threads = threads
        self._memory_limit_mb = memory_limit_mb
        self._db: Any = None
        self._pid = 0
        self._generation = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        # path -> ((st_dev, st_ino, st_size, st_ctime_ns, st_mtime_ns), the manifest's SHA-256) it matched
        self._trusted: dict[str, tuple[tuple[int, ...], str]] = {}

    def _connection(self) -> Any:
        """This thread's DuckDB connection (made on first use, kept for the next read)."""
        local = self._local
        if getattr(local, "generation", None) == self._generation and self._pid == os.getpid():
            return local.connection
        import duckdb

        with self._lock:
            if self._db is None or self._pid != os.getpid():  # a forked child opens its own
                db = duckdb.connect(config={
                    "threads": self._threads, "memory_limit": f"{self._memory_limit_mb}MB"})
                # Footers parsed once per file and process, for every connection: GLOBAL, since a
                # plain SET holds for the connection that runs it only (not for its cursors).
                db.execute("SET GLOBAL parquet_metadata_cache = true")
                self._db, self._pid = db, os.getpid()
                self._generation += 1
            local.connection, local.generation = self._db.cursor(), self._generation
        return local.connection

    def check(self, day: ColdDay) -> Path:
        """The day's file, once it is known to match its manifest; ColdFileCorrupt otherwise.
        Every read: a regular file of the manifest's size ending in a Parquet footer. The full
        SHA-256 once per process, and again whenever the file's stat stamp (device, inode,
        size, ctime, mtime) is not the one it was verified with."""
        path, st = regular_file_stat(self.archive_dir, day.file)
        key = str(path)
        if st.st_size != day.size_bytes:
            self._trusted.pop(key, None)
            raise ColdFileCorrupt(path, f"{st.st_size} bytes where the manifest says {day.size_bytes}: "
                                        "truncated or altered")
        problem = parquet_tail_problem(path, st.st_size)
        if problem is not None:
            self._trusted.pop(key, None)
            raise ColdFileCorrupt(path, problem)
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns, st.st_mtime_ns)
        if self._trusted.get(key) != (stamp, day.sha256):
            self._trusted.pop(key, None)
            sha, _ = file_sha256(path)
            if sha != day.sha256:
                raise ColdFileCorrupt(path, f"SHA-256 {sha} does not match the manifest's {day.sha256}: "
                                            "the file was altered")
            self._trusted[key] = (stamp, day.sha256)
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
            try:
                table = self._connection().sql(
                    sql, params=[files, device_id, since, until, limit - len(out)]).to_arrow_table()
            except duckdb.Error as exc:  # a damaged page or footer that kept its size and stamps
                raise ColdFileCorrupt(", ".join(Path(f).name for f in files),
                                      f"unreadable: {str(exc).splitlines()[0]}") from None
            out.extend(_to_records(table))
            if len(out) >= limit:
                break
        return out

    def explain(
        self, device_id: int, since: datetime, until: datetime, days: Sequence[ColdDay], analyze: bool = False,
    ) -> str:
        """DuckDB's plan of one read over these days (to show and test the pushed-down filters);
        with ``analyze``, run it and include what each operator did."""
        files = [str(self.check(d)) for d in days]
        verb = "EXPLAIN ANALYZE" if analyze else "EXPLAIN"
        rows = self._connection().execute(f"{verb} {_READ_SQL.format(direction='DESC')}",
                                          [files, device_id, since, until, 1440]).fetchall()
        return "\n".join(str(r[-1]) for r in rows)

    def close(self) -> None:
        """Close the in-process database (each thread's connection with it)."""
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None
            self._generation += 1


def _steps(days: list[ColdDay]) -> Iterator[list[ColdDay]]:
    """1, 2, 4, 8 ... days at a time: a page near the start of the order touches one file."""
    i, size = 0, 1
    while i < len(days):
        yield days[i:i + size]
        i += size
        size *= 2
