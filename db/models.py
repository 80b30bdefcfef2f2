"""The schema, in SQLAlchemy 2.0 style. This file doubles as the schema document.

The migrations in ``migrations/versions`` create exactly this (plus the partitioning DDL that
SQLAlchemy cannot express); ``tests/db/test_schema.py`` checks they agree.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    REAL,
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    PrimaryKeyConstraint,
    SmallInteger,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Device(Base):
    """An enrolled device. Tokens are stored only as SHA-256 hashes."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    device_uid: Mapped[str] = mapped_column(Text, unique=True)
    name: Mapped[str | None] = mapped_column(Text)
    labels: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))
    token_hash: Mapped[bytes] = mapped_column(unique=True)
    prev_token_hash: Mapped[bytes | None]
    prev_token_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enrolled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # when the tokens last changed; workers poll it to evict cached tokens
    auth_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_devices_auth_changed_at", "auth_changed_at", postgresql_where=text("auth_changed_at IS NOT NULL")),
        Index("ix_devices_prev_token_hash", "prev_token_hash", postgresql_where=text("prev_token_hash IS NOT NULL")),
        Index("ix_devices_labels", "labels", postgresql_using="gin"),
    )


class HeartbeatColumns:
    """The columns of a heartbeat, as both heartbeats and device_last_status keep them (mirroring
    db.heartbeats.HeartbeatRow; tests/db/test_heartbeat_columns.py checks they agree)."""

    device_id: Mapped[int] = mapped_column(BigInteger)
    bucket_ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    clock_skew_s: Mapped[float] = mapped_column(REAL)
    battery_pct: Mapped[int] = mapped_column(SmallInteger)
    charging: Mapped[bool] = mapped_column(Boolean)
    network_type: Mapped[str] = mapped_column(Text)
    signal_dbm: Mapped[int | None] = mapped_column(SmallInteger)
    app_version: Mapped[str] = mapped_column(Text)
    os_version: Mapped[str] = mapped_column(Text)
    uptime_s: Mapped[int] = mapped_column(BigInteger)
    free_storage_mb: Mapped[int] = mapped_column(Integer)


class Heartbeat(HeartbeatColumns, Base):
    """One stored heartbeat. Partitioned by RANGE (bucket_ts), one partition a day
    (``heartbeats_pYYYYMMDD``); the primary key (device, bucket) makes retries in one bucket a
    conflict. ``extra``: the fields a device sent beyond the schema."""

    __tablename__ = "heartbeats"

    extra: Mapped[dict | None] = mapped_column(JSONB, sort_order=1)  # after the shared columns

    __table_args__ = (PrimaryKeyConstraint("device_id", "bucket_ts"), {"postgresql_partition_by": "RANGE (bucket_ts)"})


class DeviceLastStatus(HeartbeatColumns, Base):
    """The newest stored heartbeat of each device: fleet reads are O(1) per device."""

    __tablename__ = "device_last_status"

    __table_args__ = (
        PrimaryKeyConstraint("device_id"),
        Index("ix_last_status_received_at", "received_at"),
        Index("ix_last_status_battery", "battery_pct"),
        Index("ix_last_status_app_version", "app_version"),
    )


class HbPartition(Base):
    """Every daily partition the jobs know of, and what became of it."""

    __tablename__ = "hb_partitions"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    range_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    range_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # active|archived|dropped|restored|expired (0005: an archive's files deleted after RETENTION_DAYS)
    state: Mapped[str] = mapped_column(Text, server_default=text("'active'"))
    row_count: Mapped[int | None] = mapped_column(BigInteger)
    archive_path: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    restored_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # 0003
    archive_format: Mapped[str | None] = mapped_column(Text)  # copy | parquet (0005)
    archive_bytes: Mapped[int | None] = mapped_column(BigInteger)  # 0005
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # 0005


class JobRun(Base):
    """One run (or skipped run) of a scheduled job."""

    __tablename__ = "job_runs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(Text)  # running|succeeded|failed|skipped
    rows_affected: Mapped[int | None] = mapped_column(BigInteger)
    detail: Mapped[dict | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    trigger: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_job_runs_job_started", "job", "started_at"),
        # The checks every firing makes (db/job_runs.py; 0006).
        Index("ix_job_runs_succeeded_period", "job", text("(detail->>'period')"),
              postgresql_where=text("status = 'succeeded'")),
        Index("ix_job_runs_running", text("(COALESCE(detail->>'lock', job))"),
              postgresql_where=text("status = 'running'")),
    )


class DeviceEventState(Base):
    """What the events job last saw of each device; an event is a change of this row (0004)."""

    __tablename__ = "device_event_state"

    device_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    online: Mapped[bool | None] = mapped_column(Boolean)  # None: never seen
    battery_band: Mapped[str | None] = mapped_column(Text)  # ok|low|critical, None: never seen
    app_version: Mapped[str | None] = mapped_column(Text)
    revoked: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))


class Event(Base):
    """One transition of one device. Partitioned by RANGE (occurred_at), one partition a day
    (``events_pYYYYMMDD``), dropped after EVENTS_RETENTION_DAYS. Ids grow in commit order: only
    the events job (under its advisory lock) inserts."""

    __tablename__ = "events"

    device_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    type: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'"))

    __table_args__ = (
        Index("ix_events_id", "id"),
        Index("ix_events_type_id", "type", "id"),
        {"postgresql_partition_by": "RANGE (occurred_at)"},
    )


class Webhook(Base):
    """A receiver of events. ``cursor_event_id``: events up to it are already in deliveries."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))  # empty: all
    secret: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cursor_event_id: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One signed batch of events for one webhook, and every attempt to deliver it."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    webhook_id: Mapped[int] = mapped_column(BigInteger)
    idempotency_key: Mapped[str] = mapped_column(UUID(as_uuid=False), unique=True)
    first_event_id: Mapped[int] = mapped_column(BigInteger)
    last_event_id: Mapped[int] = mapped_column(BigInteger)
    event_count: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default=text("'pending'"))  # pending|delivered|failed|cancelled
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    attempt_log: Mapped[list] = mapped_column(JSONB, server_default=text("'[]'"))

    __table_args__ = (Index("ix_webhook_deliveries_webhook", "webhook_id", "id"),)


class OperatorKey(Base):
    """A named operator key (sent as x-admin) with a role; stored only as a SHA-256 hash."""

    __tablename__ = "operator_keys"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    role: Mapped[str] = mapped_column(Text)  # viewer|operator|admin
    key_hash: Mapped[bytes] = mapped_column(unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    created_by: Mapped[str] = mapped_column(Text)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    """One change made by an operator (or refused): who, what, when, from where, outcome."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    actor: Mapped[str] = mapped_column(Text)  # the key's name; "ADMIN_KEY" for the bootstrap key
    actor_key_id: Mapped[int | None] = mapped_column(BigInteger)
    actor_role: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)  # device.enroll, device.rotate, job.run, key.create, ...
    target: Mapped[str | None] = mapped_column(Text)
    source_addr: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)  # ok|denied|failed
    detail: Mapped[dict | None] = mapped_column(JSONB)

    __table_args__ = (Index("ix_audit_log_action_id", "action", "id"),)
