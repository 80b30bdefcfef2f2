"""The nightly archive job and restore.

nightly, ``ARCHIVE_FORMAT=parquet`` (the default): each partition older than HOT_DAYS becomes
``ARCHIVE_DIR/<partition>.parquet`` (the cold tier, db/cold.py; written and read back against
the source by scheduler/jobs/cold_export.py), and the history endpoint reads it from there.
Cold days older than RETENTION_DAYS have their files deleted and are marked 'expired'.

``ARCHIVE_FORMAT=copy`` (the earlier format): each partition older than RETENTION_DAYS is
exported with COPY to ``ARCHIVE_DIR/<partition>.copy.gz`` (PostgreSQL COPY text format, gzip,
rows in key order, so one partition always gives the same bytes), its SHA-256 computed while
streaming, and kept. History does not read these; restore brings a day back.

Either way the file is read back before anything is dropped: SHA-256 and row count must match
what was written; only then is a manifest written beside it and the partition detached,
counted once more, dropped, and marked archived in hb_partitions — all in one transaction. A
partition whose archive did not verify is never dropped.

The export runs in a child process (``python -m scheduler export``): inside the API workers
psycogreen's wait callback is active and psycopg2's COPY raises there, and a long export would
hold the gevent hub anyway. The child is plain psycopg2; the parent waits on it cooperatively.

restore: ``python -m scheduler restore <manifest>`` checks the file's SHA-256, size and row
count against the manifest (a tampered or truncated file is refused before anything changes),
then loads it into a fresh table and attaches it as the day's partition again, in one
transaction. Restored partitions are kept RESTORE_KEEP_DAYS before nightly archives them again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import errors as pg_errors
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from config.settings import PROJECT_ROOT, Settings
from db.heartbeats import COLUMNS
from db.job_runs import prune_runs
from db.partitions import PartitionSpec, day_of, lock_partition_ddl
from scheduler.locking import JobOutcome, Progress

ARCHIVE_COLUMNS = (*COLUMNS, "extra")
FORMAT = "postgresql-copy-text"
COMPRESSION = "gzip"
PARQUET = "parquet"
# manifest format -> (its compression, ARCHIVE_FORMAT's name for it, data file suffix)
FORMATS = {FORMAT: (COMPRESSION, "copy", ".copy.gz"), PARQUET: ("zstd", "parquet", ".parquet")}
MANIFEST_VERSION = 1
_CHUNK = 1 << 20
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,255}")
_PROGRESS_EVERY_S = 5.0
EXPORTED = "exported"
EXPORT_FAILED = "export-failed"


class ArchiveError(Exception):
    """An archive could not be made, verified or restored; ``detail`` says which and why."""

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.detail = detail


class ArchiveCorrupt(ArchiveError):
    """The archive file does not match its manifest (tampered, truncated or unreadable)."""


class RestoreRefused(ArchiveError):
    """Restore will not proceed (bad manifest, corrupt file, partition already present)."""


# ---- the manifest -------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """What an archive file holds and how to check it; stored as JSON beside the file."""

    partition: str
    range_start: str
    range_end: str
    row_count: int
    sha256: str
    size_bytes: int
    file: str
    columns: list[str]
    schema_version: str
    created_at: str
    format: str = FORMAT
    compression: str = COMPRESSION
    manifest_version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        """The manifest as indented JSON."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and check a manifest; RestoreRefused when it is not one of ours."""
        try:
            raw = json.loads(text)
            manifest = cls(**raw)
        except (ValueError, TypeError) as exc:
            raise RestoreRefused(f"not a NexMDM archive manifest: {exc}") from None
        if manifest.manifest_version != MANIFEST_VERSION or manifest.format not in FORMATS \
                or manifest.compression != FORMATS[manifest.format][0]:
            raise RestoreRefused(
                f"unsupported archive: version {manifest.manifest_version}, {manifest.format}, "
                f"{manifest.compression}")
        if day_of(manifest.partition) is None:
            raise RestoreRefused(f"manifest names {manifest.partition!r}, not a heartbeats_pYYYYMMDD partition")
        for name, kind in (("partition", str), ("file", str), ("sha256", str), ("row_count", int),
                           ("size_bytes", int)):
            value = getattr(manifest, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise RestoreRefused(f"manifest field {name!r} must be a {kind.__name__}, got {value!r}")
        if not _FILE_NAME_RE.fullmatch(manifest.file) or manifest.file in (".", ".."):
            raise RestoreRefused(f"manifest file name {manifest.file!r} must not contain a path (a plain name)")
        return manifest

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read a manifest file."""
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as exc:
            raise RestoreRefused(f"cannot read manifest {path}: {exc.strerror}") from None

    def data_path(self, manifest_path: Path) -> Path:
        """The archive file, looked up beside the manifest (so archives can be moved together).
        RestoreRefused unless it is a regular file in that directory: a symlink (to /etc/shadow,
        say), a directory or a device is never read."""
        path = Path(manifest_path).resolve().parent / self.file
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return path  # verify_archive reports it missing
        except OSError as exc:
            raise RestoreRefused(f"cannot read {path}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise RestoreRefused(f"{path} is not a regular file (symlinks, directories and devices are refused)")
        return path

    @property
    def spec(self) -> PartitionSpec:
        day = day_of(self.partition)
        assert day is not None
        return PartitionSpec(self.partition, day)


def data_file_name(partition: str, archive_format: str = "copy") -> str:
    """``<partition>.copy.gz``, or ``<partition>.parquet`` for ``archive_format='parquet'``."""
    return f"{partition}.parquet" if archive_format == PARQUET else f"{partition}.copy.gz"


def manifest_file_name(partition: str) -> str:
    """``<partition>.manifest.json``."""
    return f"{partition}.manifest.json"


# ---- planning (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionInfo:
    """An attached partition and what hb_partitions says of it."""

    name: str
    day: date
    state: str = "active"
    restored_at: datetime | None = None


def plan_archive(
    partitions: list[PartitionInfo], today: date, retention_days: int, restore_keep_days: int, now: datetime
) -> list[str]:
    """Partitions to archive, oldest first: every day before ``today - retention_days``, except
    restored ones still inside their ``restore_keep_days``. Pure."""
    if retention_days < 1:
        raise ValueError("RETENTION_DAYS must be at least 1 (today's partition is never archived)")
    cutoff = today - timedelta(days=retention_days)
    chosen = []
    for part in sorted(partitions, key=lambda p: p.day):
        if part.day >= cutoff:
            continue
        if part.state == "restored" and part.restored_at is not None \
                and now < part.restored_at + timedelta(days=restore_keep_days):
            continue
        chosen.append(part.name)
    return chosen


def list_partition_infos(conn: Connection) -> list[PartitionInfo]:
    """Attached partitions named heartbeats_pYYYYMMDD, with their hb_partitions state."""
    rows = conn.exec_driver_sql(
        """
        SELECT c.relname, hp.state, hp.restored_at FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
        LEFT JOIN hb_partitions hp ON hp.name = c.relname
        WHERE p.relname = 'heartbeats'
        """
    ).fetchall()
    infos = []
    for name, state, restored_at in rows:
        day = day_of(name)
        if day is not None:  # jobs touch only tables named like ours
            infos.append(PartitionInfo(name, day, state or "active", restored_at))
    return infos


# ---- files: write with a running hash, read back and verify ---------------------------------


class _HashingFile:
    """A binary file that hashes and counts every byte written to it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


class _RowSink:
    """Where COPY writes rows: buffered into the gzip stream, rows counted, progress reported."""

    def __init__(self, gz: gzip.GzipFile, progress: Progress, name: str) -> None:
        self.gz = gz
        self.buf = bytearray()
        self.rows = 0
        self.progress = progress
        self.name = name
        self.last_report = time.monotonic()

    def write(self, data: bytes | str) -> None:
        self.buf += data.encode() if isinstance(data, str) else data
        if len(self.buf) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.rows += self.buf.count(b"\n")
            self.gz.write(self.buf)
            self.buf.clear()
        if time.monotonic() - self.last_report >= _PROGRESS_EVERY_S:
            self.last_report = time.monotonic()
            self.progress(f"{self.name}: {self.rows:,} rows exported")


def file_digest(path: Path) -> tuple[str, int]:
    """(SHA-256 hex, size in bytes) of a file, streamed."""
    sha = hashlib.sha256()
    size = 0
    # O_NOFOLLOW: a symlink swapped in after data_path checked the file is not followed either.
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def count_archive_rows(path: Path) -> int:
    """Rows in a gzip'd COPY text file (one line per row) or a Parquet file (every page
    decoded); ArchiveCorrupt when it will not decompress to the end (truncated or damaged)."""
    if path.name.endswith(".parquet"):
        from db.cold import ColdFileCorrupt
        from scheduler.jobs.cold_export import parquet_rows

        try:
            return parquet_rows(path)
        except ColdFileCorrupt as exc:
            raise ArchiveCorrupt(str(exc), file=str(path)) from None
    rows = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                rows += chunk.count(b"\n")
    except (EOFError, OSError, zlib.error) as exc:
        raise ArchiveCorrupt(f"{path.name} does not decompress: {exc}", file=str(path)) from None
    return rows


def verify_archive(path: Path, sha256: str, row_count: int, size_bytes: int | None = None) -> None:
    """Read the file back: its SHA-256, size and row count must be as expected; else ArchiveCorrupt."""
    if not path.exists():
        raise ArchiveCorrupt(f"archive file {path} is missing", file=str(path))
    actual_sha, actual_size = file_digest(path)
    if size_bytes is not None and actual_size != size_bytes:
        raise ArchiveCorrupt(
            f"{path.name} is {actual_size} bytes, the manifest says {size_bytes}: truncated or altered",
            file=str(path), expected_size=size_bytes, actual_size=actual_size)
    if actual_sha != sha256:
        raise ArchiveCorrupt(
            f"{path.name}: SHA-256 {actual_sha} does not match the manifest's {sha256}: the file was altered",
            file=str(path), expected_sha256=sha256, actual_sha256=actual_sha)
    rows = count_archive_rows(path)
    if rows != row_count:
        raise ArchiveCorrupt(f"{path.name} holds {rows} rows, expected {row_count}",
                             file=str(path), expected_rows=row_count, actual_rows=rows)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _require_plain_psycopg2(what: str) -> None:
    if psycopg2.extensions.get_wait_callback() is not None:
        raise ArchiveError(
            f"{what} needs COPY, which psycopg2 refuses while a wait callback (psycogreen) is active; "
            "run it in a child process (python -m scheduler ...)")


# ---- export (runs in the child process) -----------------------------------------------------


def _copy_out(
    conn: Any, name: str, tmp: Path, gzip_level: int, statement_timeout_ms: int, progress: Progress
) -> tuple[int, _RowSink, _HashingFile, str]:
    conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
    with conn.cursor() as cur:
        cur.execute("SET statement_timeout = %s", (statement_timeout_ms,))
        cur.execute("SELECT version_num FROM alembic_version")
        schema_version = cur.fetchone()[0]
        cols = ", ".join(ARCHIVE_COLUMNS)
        with open(tmp, "wb") as raw:
            hashing = _HashingFile(raw)
            with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, compresslevel=gzip_level, mtime=0) as gz:
                sink = _RowSink(gz, progress, name)
                cur.copy_expert(
                    f'COPY (SELECT {cols} FROM "{name}" ORDER BY device_id, bucket_ts) TO STDOUT', sink, size=_CHUNK)
                sink.flush()
            raw.flush()
            os.fsync(raw.fileno())
        copied = cur.rowcount
    conn.rollback()
    return copied, sink, hashing, schema_version


def _export_paths(name: str, archive_dir: Path, archive_format: str) -> tuple[PartitionSpec, Path, Path]:
    """The partition's spec, its archive file and the temporary name it is written under
    (``archive_dir`` created); refuses a name that is no day partition, or a gevent process."""
    day = day_of(name)
    if day is None:
        raise ArchiveError(f"{name!r} is not a heartbeats_pYYYYMMDD partition")
    _require_plain_psycopg2("export")
    archive_dir.mkdir(parents=True, exist_ok=True)
    final = archive_dir / data_file_name(name, archive_format)
    return PartitionSpec(name, day), final, archive_dir / f".{final.name}.tmp"


def export_partition(
    dsn: str, name: str, archive_dir: Path, *, gzip_level: int, statement_timeout_ms: int, progress: Progress
) -> Manifest:
    """COPY one partition to ``archive_dir``, verify the file by reading it back, write the
    manifest; returns it. Plain psycopg2: not for use inside the gevent server."""
    spec, final, tmp = _export_paths(name, archive_dir, "copy")
    progress(f"{name}: exporting to {final}")
    conn = psycopg2.connect(dsn, application_name="nexmdm-archive")
    try:
        copied, sink, hashing, schema_version = _copy_out(conn, name, tmp, gzip_level, statement_timeout_ms,
                                                          progress)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave half a file that looks like an archive in progress
        raise
    finally:
        conn.close()
    if copied != sink.rows:
        tmp.unlink(missing_ok=True)
        raise ArchiveError(f"{name}: COPY reported {copied} rows but {sink.rows} lines were written")
    os.replace(tmp, final)
    _fsync_dir(archive_dir)
    sha256 = hashing.sha.hexdigest()
    progress(f"{name}: {copied:,} rows, {hashing.size:,} bytes, sha256 {sha256}; reading back")
    verify_archive(final, sha256, copied, hashing.size)
    manifest = Manifest(
        partition=name, range_start=spec.range_start.isoformat(), range_end=spec.range_end.isoformat(),
        row_count=copied, sha256=sha256, size_bytes=hashing.size, file=final.name,
        columns=list(ARCHIVE_COLUMNS), schema_version=schema_version,
        created_at=datetime.now(UTC).isoformat(),
    )
    _write_atomically(archive_dir / manifest_file_name(name), manifest.to_json().encode())
    progress(f"{name}: verified; manifest {manifest_file_name(name)} written")
    return manifest


def export_partition_parquet(
    dsn: str, name: str, archive_dir: Path, *, statement_timeout_ms: int, progress: Progress,
    sample_rows: int = 256,
) -> Manifest:
    """Write one partition as ``<name>.parquet`` and read it back against the partition (count,
    column sums, a sample of rows), in one snapshot; then its manifest. Plain psycopg2: not for
    use inside the gevent server. A file that does not verify is deleted, never kept."""
    from scheduler.jobs.cold_export import copy_to_parquet, source_checksums, verify_against_source

    spec, final, tmp = _export_paths(name, archive_dir, PARQUET)
    day = spec.day
    progress(f"{name}: exporting to {final}")
    conn = psycopg2.connect(dsn, application_name="nexmdm-archive")
    try:
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = %s", (statement_timeout_ms,))
            cur.execute("SELECT version_num FROM alembic_version")
            schema_version = cur.fetchone()[0]
            expected = source_checksums(cur, name, day)  # same snapshot as the COPY below
        written = copy_to_parquet(conn, name, tmp, progress)
        if written != expected.rows:
            raise ArchiveError(f"{name}: {written} rows written, the partition holds {expected.rows}")
        sha256, size = file_digest(tmp)
        progress(f"{name}: {written:,} rows, {size:,} bytes ({size / max(written, 1):.1f} per heartbeat), "
                 f"sha256 {sha256}; reading back")
        with conn.cursor() as cur:
            verify_against_source(cur, name, day, tmp, expected, sample_rows)
        if file_digest(tmp) != (sha256, size):
            raise ArchiveCorrupt(f"{tmp.name} changed while it was being verified", file=str(tmp))
        conn.rollback()
    except BaseException:
        tmp.unlink(missing_ok=True)  # only a verified file takes the archive's name
        raise
    finally:
        conn.close()
    os.replace(tmp, final)
    _fsync_dir(archive_dir)
    manifest = Manifest(
        partition=name, range_start=spec.range_start.isoformat(), range_end=spec.range_end.isoformat(),
        row_count=written, sha256=sha256, size_bytes=size, file=final.name,
        columns=list(ARCHIVE_COLUMNS), schema_version=schema_version,
        created_at=datetime.now(UTC).isoformat(), format=PARQUET, compression=FORMATS[PARQUET][0],
    )
    _write_atomically(archive_dir / manifest_file_name(name), manifest.to_json().encode())
    progress(f"{name}: verified against the partition; manifest {manifest_file_name(name)} written")
    return manifest


def dsn_of(engine: Engine) -> str:
    """A libpq URL for the engine's database (for psycopg2.connect and child processes)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def export_in_child(
    dsn: str, names: list[str], settings: Settings, progress: Progress
) -> Iterator[tuple[str, Manifest | ArchiveError]]:
    """Export partitions in one child process (``python -m scheduler export NAME...``), yielding
    each partition's manifest, or its error, as soon as the child has verified it. Works inside
    the gevent server: the standard library's subprocess is cooperative once gevent patched it."""
    env = dict(
        os.environ,
        DATABASE_URL=dsn,
        ARCHIVE_DIR=str(settings.archive_dir),
        ARCHIVE_GZIP_LEVEL=str(settings.archive_gzip_level),
        JOB_STATEMENT_TIMEOUT_MS=str(settings.job_statement_timeout_ms),
        ARCHIVE_FORMAT=settings.archive_format,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "scheduler", "export", *names],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    timer = threading.Timer(settings.archive_export_timeout_s, proc.kill)
    timer.start()
    pending = list(names)
    last = ""
    try:
        assert proc.stdout is not None
        for raw_line in proc.stdout:
            line = raw_line.decode(errors="replace").rstrip("\n")
            kind, _, rest = line.partition(": ")
            if kind == EXPORTED:
                manifest = Manifest.from_json(rest)
                pending.remove(manifest.partition)
                yield manifest.partition, manifest
            elif kind == EXPORT_FAILED:
                name, _, error = rest.partition(": ")
                pending.remove(name)
                yield name, ArchiveError(error, partition=name)
            elif line:
                last = line
                progress(line)
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for name in pending:  # the child died (or was killed on timeout) before reaching these
        yield name, ArchiveError(f"export child exited with code {code} before {name}: {last}", partition=name)


def export_for_parent(settings: Settings, names: list[str]) -> int:
    """The child's side of ``export_in_child``: export each partition, print one result line
    per partition; 0 when all were exported."""
    failures = 0
    for name in names:
        try:
            if settings.archive_format == PARQUET:
                manifest = export_partition_parquet(
                    settings.database_url or "", name, settings.archive_dir,
                    statement_timeout_ms=settings.job_statement_timeout_ms,
                    progress=lambda line: print(line, flush=True))
            else:
                manifest = export_partition(
                    settings.database_url or "", name, settings.archive_dir,
                    gzip_level=settings.archive_gzip_level, statement_timeout_ms=settings.job_statement_timeout_ms,
                    progress=lambda line: print(line, flush=True))
        except Exception as exc:  # reported to the parent, which keeps that partition
            failures += 1
            message = " ".join(f"{type(exc).__name__}: {exc}".split())
            print(f"{EXPORT_FAILED}: {name}: {message}", flush=True)
        else:
            print(f"{EXPORTED}: {json.dumps(asdict(manifest))}", flush=True)
    return 1 if failures else 0


# ---- detach and drop (the parent, under the job lock) ---------------------------------------


def drop_archived_partition(
    engine: Engine, manifest: Manifest, archive_path: Path, settings: Settings, attempts: int = 3,
    lock_timeout_s: float = 3.0,
) -> None:
    """Check the partition still holds exactly the archived rows, then detach and drop it and
    mark it archived — one transaction; nothing changes when the count differs.

    The count runs under a SHARE lock on that day only; the exclusive lock on ``heartbeats``
    that detaching needs is taken last and held only for catalog changes, and waited for at most
    ``lock_timeout`` (then tried again), so heartbeats never queue behind the job for long."""
    name = manifest.partition
    for attempt in range(1, attempts + 1):
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(settings.job_statement_timeout_ms)}")
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(lock_timeout_s * 1000)}")
                lock_partition_ddl(conn)
                conn.exec_driver_sql(f'LOCK TABLE "{name}" IN SHARE MODE')
                rows = conn.exec_driver_sql(f'SELECT count(*) FROM "{name}"').scalar_one()
                if rows != manifest.row_count:
                    raise ArchiveError(
                        f"{name} holds {rows} rows but its archive has {manifest.row_count}; not dropped",
                        partition=name, table_rows=rows, archived_rows=manifest.row_count)
                conn.exec_driver_sql(f'ALTER TABLE heartbeats DETACH PARTITION "{name}"')
                conn.exec_driver_sql(f'DROP TABLE "{name}"')
                conn.exec_driver_sql(
                    """
                    INSERT INTO hb_partitions (name, range_start, range_end, state, row_count, archive_path,
                                               sha256, archived_at, archive_format, archive_bytes)
                    VALUES (%(name)s, %(start)s, %(end)s, 'archived', %(rows)s, %(path)s, %(sha)s, now(),
                            %(format)s, %(bytes)s)
                    ON CONFLICT (name) DO UPDATE SET state = 'archived', row_count = EXCLUDED.row_count,
                        archive_path = EXCLUDED.archive_path, sha256 = EXCLUDED.sha256,
                        archived_at = now(), restored_at = NULL, archive_format = EXCLUDED.archive_format,
                        archive_bytes = EXCLUDED.archive_bytes, expired_at = NULL
                    """,
                    {"name": name, "start": manifest.spec.range_start, "end": manifest.spec.range_end,
                     "rows": manifest.row_count, "path": str(archive_path), "sha": manifest.sha256,
                     "format": FORMATS[manifest.format][1], "bytes": manifest.size_bytes},
                )
            return
        except DBAPIError as exc:
            if not isinstance(exc.orig, pg_errors.LockNotAvailable) or attempt == attempts:
                raise
            time.sleep(2.0 * attempt)  # busy table: let the queue drain, then try again


def archive_after_days(settings: Settings) -> int:
    """Days a partition stays in PostgreSQL: HOT_DAYS with Parquet (history reads the rest
    from the files), RETENTION_DAYS with COPY files (which history cannot read)."""
    return settings.hot_days if settings.archive_format == PARQUET else settings.retention_days


@dataclass(frozen=True)
class ExpiredDay:
    """A cold day whose files are past RETENTION_DAYS."""

    name: str
    day: date
    archive_path: str


def plan_expiry(archived: list[ExpiredDay], today: date, retention_days: int) -> list[ExpiredDay]:
    """Parquet days older than ``today - retention_days``, oldest first. Pure."""
    cutoff = today - timedelta(days=retention_days)
    return sorted((a for a in archived if a.day < cutoff), key=lambda a: a.day)


def expire_cold_days(engine: Engine, settings: Settings, today: date, progress: Progress) -> list[dict[str, Any]]:
    """Mark Parquet days past RETENTION_DAYS 'expired' (committed first, so no reader is sent to
    a file about to go), then delete their files; returns what was expired. COPY archives are
    never deleted: with ARCHIVE_FORMAT=copy they are the only copy of the day."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT name, range_start, archive_path FROM hb_partitions "
            "WHERE state = 'archived' AND archive_format = 'parquet'").fetchall()
        conn.rollback()
    candidates = [ExpiredDay(n, start.astimezone(UTC).date(), path) for n, start, path in rows
                  if day_of(n) is not None]
    expired = []
    for item in plan_expiry(candidates, today, settings.retention_days):
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE hb_partitions SET state = 'expired', expired_at = now() "
                "WHERE name = %(n)s AND state = 'archived'", {"n": item.name})
        removed = []
        for file in (data_file_name(item.name, PARQUET), manifest_file_name(item.name)):
            path = settings.archive_dir / file
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(file)
        _fsync_dir(settings.archive_dir)
        progress(f"{item.name}: past {settings.retention_days} days; expired, "
                 f"deleted {', '.join(removed) or 'nothing'}")
        expired.append({"partition": item.name, "day": item.day.isoformat(), "files_deleted": removed})
    return expired


def run_nightly(engine: Engine, settings: Settings, *, now: datetime, progress: Progress) -> JobOutcome:
    """The nightly job body: archive and drop every partition past HOT_DAYS (Parquet) or
    RETENTION_DAYS (COPY), each on its own (one failure leaves that partition in place and fails
    the run); delete Parquet days past RETENTION_DAYS; prune old job_runs."""
    today = now.astimezone(UTC).date()
    with engine.connect() as conn:
        infos = list_partition_infos(conn)
        conn.rollback()
    keep_days = archive_after_days(settings)
    plan = plan_archive(infos, today, keep_days, settings.restore_keep_days, now)
    progress(f"{len(infos)} partitions; {len(plan)} older than {keep_days} days to archive as "
             f"{settings.archive_format} (today {today})")
    dsn = dsn_of(engine)
    archived: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    exports = export_in_child(dsn, plan, settings, progress) if plan else iter(())
    for name, exported in exports:
        try:
            if isinstance(exported, Exception):
                raise exported
            manifest = exported
            path = settings.archive_dir / manifest.file
            drop_archived_partition(engine, manifest, path, settings)
        except Exception as exc:  # keep going: one bad partition must not block the others
            progress(f"{name}: NOT archived: {exc}")
            failed.append({"partition": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        progress(f"{name}: detached and dropped ({manifest.row_count:,} rows archived)")
        archived.append({"partition": name, "rows": manifest.row_count, "sha256": manifest.sha256,
                         "file": str(path), "bytes": manifest.size_bytes})
    expired = expire_cold_days(engine, settings, today, progress) if settings.archive_format == PARQUET else []
    with engine.begin() as conn:
        pruned = prune_runs(conn, before=now - timedelta(days=settings.job_runs_keep_days))
    detail = {"today": today.isoformat(), "format": settings.archive_format, "archived": archived,
              "failed": failed, "expired": expired, "job_runs_pruned": pruned}
    if failed:
        raise ArchiveError(f"{len(failed)} of {len(plan)} partitions could not be archived", **detail)
    return JobOutcome(rows_affected=sum(a["rows"] for a in archived), detail=detail)


# ---- restore (CLI process) -----------------------------------------------------------------


def restore_archive(engine: Engine, manifest_path: Path, progress: Progress) -> JobOutcome:
    """Verify an archive against its manifest, then bring it back as an attached partition
    (state 'restored'). Refuses, changing nothing, when anything does not match."""
    manifest = Manifest.load(manifest_path)
    data = manifest.data_path(manifest_path)
    progress(f"{manifest.partition}: verifying {data} ({manifest.row_count:,} rows, sha256 {manifest.sha256})")
    try:
        verify_archive(data, manifest.sha256, manifest.row_count, manifest.size_bytes)
    except ArchiveCorrupt as exc:
        raise RestoreRefused(f"refusing to restore: {exc}", **exc.detail) from None
    _require_plain_psycopg2("restore")
    spec = manifest.spec
    name = spec.name
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
        conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
        lock_partition_ddl(conn)
        live_columns = {r[0] for r in conn.exec_driver_sql(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'heartbeats'::regclass "
            "AND attnum > 0 AND NOT attisdropped")}
        missing = [c for c in manifest.columns if c not in live_columns]
        if missing:
            raise RestoreRefused(f"the archive has columns the heartbeats table lacks: {missing}")
        if conn.exec_driver_sql("SELECT to_regclass(%(n)s)", {"n": name}).scalar_one() is not None:
            raise RestoreRefused(f"table {name} exists already; drop or rename it first", partition=name)
        overlap = conn.exec_driver_sql(
            "SELECT count(*) FROM heartbeats WHERE bucket_ts >= %(s)s AND bucket_ts < %(e)s",
            {"s": spec.range_start, "e": spec.range_end}).scalar_one()
        if overlap:
            raise RestoreRefused(f"heartbeats already holds {overlap} rows in {name}'s range", partition=name)
        progress(f"{name}: loading")
        conn.exec_driver_sql(f'CREATE TABLE "{name}" (LIKE heartbeats INCLUDING DEFAULTS INCLUDING CONSTRAINTS)')
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        if manifest.format == PARQUET:
            from scheduler.jobs.cold_export import copy_from_parquet

            with dbapi.cursor() as cur:
                loaded = copy_from_parquet(cur, data, name)
        else:
            with gzip.open(data, "rb") as src, dbapi.cursor() as cur:
                cur.copy_expert(f'COPY "{name}" ({", ".join(manifest.columns)}) FROM STDIN', src, size=_CHUNK)
                loaded = cur.rowcount
        if loaded != manifest.row_count:
            raise RestoreRefused(f"{name}: loaded {loaded} rows, the manifest says {manifest.row_count}")
        progress(f"{name}: {loaded:,} rows loaded; attaching (builds the primary key)")
        conn.exec_driver_sql(
            f"ALTER TABLE heartbeats ATTACH PARTITION \"{name}\" "
            f"FOR VALUES FROM ('{spec.range_start.isoformat()}') TO ('{spec.range_end.isoformat()}')")
        conn.exec_driver_sql(
            """
            INSERT INTO hb_partitions (name, range_start, range_end, state, row_count, archive_path,
                                       sha256, restored_at)
            VALUES (%(name)s, %(start)s, %(end)s, 'restored', %(rows)s, %(path)s, %(sha)s, now())
            ON CONFLICT (name) DO UPDATE SET state = 'restored', restored_at = now(),
                row_count = EXCLUDED.row_count, archive_path = EXCLUDED.archive_path, sha256 = EXCLUDED.sha256
            """,
            {"name": name, "start": spec.range_start, "end": spec.range_end, "rows": loaded,
             "path": str(data), "sha": manifest.sha256},
        )
        conn.exec_driver_sql(f'ANALYZE "{name}"')  # attaching leaves the planner without statistics
    progress(f"{name}: restored ({loaded:,} rows); kept until nightly archives it again after RESTORE_KEEP_DAYS")
    return JobOutcome(rows_affected=loaded, detail={"partition": name, "rows": loaded, "file": str(data),
                                                    "sha256": manifest.sha256})
