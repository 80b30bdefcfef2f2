"""The one typed Settings object. Nothing else in NexMDM reads os.environ."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PLANES = ("device", "operator", "all")


def default_var_dir() -> Path:
    """``var/`` of the checkout; for an installed package (``pip install .``), ``./var`` of the
    directory it runs in (site-packages is no place for a database)."""
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / "var"
    return Path.cwd().resolve() / "var"


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {raw!r}")


@dataclass(frozen=True)
class Settings:
    """Every setting of NexMDM, with units in the names.

    Build it once with ``Settings.from_env()`` (wsgi.py, CLIs) or directly in tests.
    """

    # None means the embedded default: a private PostgreSQL cluster under var_dir.
    database_url: str | None = None
    # None in development: generated once and stored under var_dir.
    admin_key: str | None = None
    # The device plane (POST /v1/heartbeat, /healthz, /readyz): what devices reach.
    host: str = "127.0.0.1"
    port: int = 8000
    web_concurrency: int = 2
    # The operator plane (admin API, /metrics, /ops/*, /openapi.json, the scheduler): its own
    # worker processes, never on the devices' port.
    admin_host: str = "127.0.0.1"
    admin_port: int = 8001
    admin_concurrency: int = 1
    # false: one gunicorn serves both planes on HOST:PORT (the layout before the split, kept
    # for side-by-side benchmarks).
    split_planes: bool = True
    # A streaming replica for the operator plane's reads (device status, fleet list and summary,
    # history); None: every read on the primary. Reads fall back to the primary while the
    # replica's lag exceeds READ_MAX_LAG_S or it cannot be reached (db/reads.py).
    read_database_url: str | None = None
    read_max_lag_s: float = 5.0
    read_lag_check_interval_s: float = 1.0
    # Which endpoints this process serves: device, operator, or all (set by the launcher per
    # gunicorn; "all" for one-process use such as tests with the Flask test client).
    plane: str = "all"
    # Connections one gunicorn worker holds at once (open keep-alive ones included): a fleet
    # whose devices each keep a connection open needs one per device, spread over the workers.
    worker_connections: int = 12_000
    db_pool_size: int = 50
    db_max_overflow: int = 50
    db_pool_timeout_s: float = 5.0
    db_statement_timeout_ms: int = 15_000
    # The group-commit writer PREPAREs its insert once per connection (planned once, not per
    # batch). Off behind a transaction-pooling PgBouncer (1.18, Debian 12): there the next
    # statement may run on another server connection, where the prepared statement does not exist.
    db_prepared_statements: bool = True
    read_from_last_status: bool = True
    dedup_bucket_seconds: int = 10
    max_clock_skew_seconds: int = 300
    offline_after_seconds: int = 180
    retention_days: int = 90
    # Days kept in PostgreSQL; older days move to Parquet files under archive_dir (the cold
    # tier, read by the history endpoint through DuckDB) when archive_format is "parquet".
    hot_days: int = 14
    archive_format: str = "parquet"  # parquet | copy (the earlier gzip'd COPY files, not read by history)
    partition_premake_days: int = 7
    archive_dir: Path = field(default_factory=lambda: default_var_dir() / "archive")
    var_dir: Path = field(default_factory=default_var_dir)
    token_cache_ttl_s: float = 86_400.0
    token_sync_interval_s: float = 1.0
    token_rotation_overlap_s: int = 3600
    max_body_bytes: int = 16_384
    max_extra_bytes: int = 4_096
    max_enroll_batch: int = 10_000
    summary_cache_ttl_s: float = 2.0
    # POST /v1/heartbeat by the lean WSGI path (api/heartbeat_wsgi.py) instead of through Flask.
    heartbeat_lean_path: bool = True
    ingest_batch_max: int = 500
    ingest_queue_max: int = 5_000
    ingest_flushers: int = 1
    # A flush waits up to INGEST_LINGER_MS after its first heartbeat until INGEST_LINGER_ROWS are
    # queued: bigger batches under moderate load (fewer statements and commits per heartbeat);
    # under saturation the rows are there at once and nobody waits. 0 ms: no waiting.
    ingest_linger_ms: float = 5.0
    ingest_linger_rows: int = 16
    ingest_timeout_s: float = 10.0
    # Load shedding (api/shedding.py): once what was admitted has waited longer than
    # INGEST_SHED_TARGET_MS (for the CPU, or to be written) throughout an INGEST_SHED_INTERVAL_MS,
    # new heartbeats are admitted only while fewer are in flight than the worker acknowledges in
    # INGEST_SHED_TARGET_MS; the rest are refused (503 + Retry-After) before any work. While the
    # worker waits for a CPU over a quarter of an interval, the target counts 4x.
    ingest_shed_target_ms: int = 100
    ingest_shed_interval_ms: int = 200
    # The longest Retry-After a refusal gives: it grows while the refused share stays high, so
    # that the devices refused come back seldom enough for refusals to cost little (api/shedding.py).
    ingest_shed_retry_after_max_s: int = 60
    scheduler_enabled: bool = True
    nightly_cron: str = "0 3 * * *"
    partitions_cron: str = "5 * * * *"
    reconcile_cron: str = "35 * * * *"
    job_statement_timeout_ms: int = 3_600_000
    archive_gzip_level: int = 6
    archive_export_timeout_s: float = 6 * 3600.0
    restore_keep_days: int = 7
    job_runs_keep_days: int = 30
    # Events (scheduler/jobs/events.py): derived every EVENTS_INTERVAL_S from device_last_status.
    events_interval_s: int = 30
    events_retention_days: int = 30
    battery_low_pct: int = 20
    battery_critical_pct: int = 10
    # A band is left only this far above its threshold, so a device at 19-20 % does not flap.
    battery_hysteresis_pct: int = 5
    # Webhooks (scheduler/jobs/webhooks.py): batches, signed, retried with backoff for a day.
    webhooks_enabled: bool = True  # send deliveries from this process's scheduler
    webhook_batch_max: int = 500
    webhook_timeout_s: float = 10.0
    webhook_retry_for_s: int = 86_400
    webhook_backoff_base_s: float = 1.0
    webhook_backoff_max_s: float = 3_600.0
    webhook_max_in_flight: int = 8
    webhook_poll_interval_s: float = 1.0
    webhook_deliveries_keep_days: int = 7
    log_level: str = "INFO"
    # Slow and idle clients (config/gunicorn_worker.py ConnectionGuard), per worker: at most
    # WORKER_CONNECTIONS connections (a new one sheds the one waiting longest for a request of its
    # own); a request's line and headers within the header timeout of its first byte (a new connection's
    # first request within that of connecting); a kept-alive connection's next request within
    # the idle timeout (> the devices' 60 s +- 15 s interval); a body within the body timeout;
    # each write of an answer within the send timeout.
    http_header_timeout_s: float = 20.0
    http_idle_timeout_s: float = 75.0
    http_body_timeout_s: float = 30.0
    http_send_timeout_s: float = 30.0
    # Failed authentications (device tokens, operator keys) from one client address within the
    # window, after which it gets 429 + Retry-After until the window ends; 0: no limit.
    auth_failure_limit: int = 20
    auth_failure_window_s: float = 60.0
    # Heartbeats a minute from one device (bursts of as many), refused with 429 + Retry-After
    # before any database work; compressed-time load (simulator --interval 1, make bench) raises it.
    device_max_per_minute: int = 30
    # A 429 of those limits is held this long before it is sent: a flood over keep-alive
    # connections slows to a request a second per connection (api/throttle.py).
    limit_refusal_delay_s: float = 1.0
    # Peers whose X-Forwarded-For is believed (comma-separated addresses or CIDR blocks, e.g. the
    # HAProxy in front); from anyone else the header is ignored and the TCP peer is the client.
    trusted_proxies: str = ""
    # "text" for people, "json" (one object per line) for log shippers: config/logs.py.
    log_format: str = "text"
    # Where the gunicorn workers' Prometheus values live (multiprocess mode); the launcher sets
    # and wipes it. None: metrics of this process only (tests with the Flask test client).
    prometheus_multiproc_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.plane not in PLANES:
            raise ValueError(f"setting PLANE={self.plane!r}: must be one of {', '.join(PLANES)}")
        if self.archive_format not in ("parquet", "copy"):
            raise ValueError(f"setting ARCHIVE_FORMAT={self.archive_format!r}: must be parquet or copy")
        if self.hot_days < 1:
            raise ValueError(f"setting HOT_DAYS={self.hot_days}: must be at least 1 (today stays hot)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from the environment (upper-case field names); overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, f.type, raw)
        values.update(overrides)
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with some fields replaced."""
        return replace(self, **overrides)

    @property
    def device_url(self) -> str:
        """Base URL of the device plane (HOST:PORT)."""
        return f"http://{self.host}:{self.port}"

    @property
    def operator_url(self) -> str:
        """Base URL of the operator plane (ADMIN_HOST:ADMIN_PORT; HOST:PORT when not split)."""
        if not self.split_planes:
            return self.device_url
        return f"http://{self.admin_host}:{self.admin_port}"

    @property
    def pool_capacity(self) -> int:
        """Connections one worker may hold at most (pool size + overflow)."""
        return self.db_pool_size + self.db_max_overflow


def _convert(name: str, type_name: Any, raw: str) -> Any:
    text = str(type_name)
    try:
        if text.startswith("bool"):
            return _parse_bool(raw)
        if text.startswith("int"):
            return int(raw)
        if text.startswith("float"):
            return float(raw)
        if text.startswith("Path"):
            return Path(raw).expanduser().resolve()
    except ValueError as exc:
        raise ValueError(f"setting {name.upper()}={raw!r}: {exc}") from None
    return raw
