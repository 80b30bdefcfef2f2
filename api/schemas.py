"""Request and response schemas (msgspec). They validate requests and generate /openapi.json."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from api.contract import PoolStatus
from db.events import EVENT_TYPES

ShortText = Annotated[str, Meta(min_length=1, max_length=64)]
# Whole-string patterns: "(?!\n)$" because Python's $ also matches before a final newline
# ("dev-a\n" beside "dev-a"); in the OpenAPI document's (ECMA) dialect it changes nothing.
Label = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/=-]+(?!\n)$")]
DeviceUid = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+(?!\n)$")]
NetworkType = Literal["wifi", "cellular", "ethernet", "none"]


@dataclass(frozen=True)
class IntQuery:
    """An integer query parameter: its bounds and default, read by the route (api/routes) and
    declared in /openapi.json from this one definition."""

    name: str
    lo: int
    hi: int
    default: int


@dataclass(frozen=True)
class TextQuery:
    """A text query parameter and the pattern it must match (empty: no filter), for the route
    and /openapi.json alike."""

    name: str
    pattern: str


DEVICES_LABEL = TextQuery("label", r"^[A-Za-z0-9_.:/=-]{0,64}$")  # what a Label can be
DEVICES_APP_VERSION = TextQuery("app_version", r"^[^\x00]{0,64}$")  # ShortText; PostgreSQL takes no NUL
DEVICES_AFTER = IntQuery("after", 0, 2**63 - 1, 0)
DEVICES_LIMIT = IntQuery("limit", 1, 1000, 100)
DEVICES_BATTERY_BELOW = IntQuery("battery_below", 0, 101, -1)  # absent: no battery filter
HISTORY_LIMIT = IntQuery("limit", 1, 10_000, 1000)
# ?source= of a history read: "any" (the replica while fresh enough, else the primary) or
# "primary" (every committed heartbeat: the simulator's no-loss check).
READ_SOURCES = ("any", "primary")
_MAX_ID = 2**63 - 1
EVENTS_DEVICE_ID = IntQuery("device_id", 1, _MAX_ID, 0)
EVENTS_AFTER = IntQuery("after", 0, _MAX_ID, 0)
EVENTS_BEFORE = IntQuery("before", 0, _MAX_ID, _MAX_ID)
EVENTS_LIMIT = IntQuery("limit", 1, 1000, 100)
_EVENT_TYPE = "(" + "|".join(EVENT_TYPES) + ")"
EVENTS_TYPES = TextQuery("type", rf"^({_EVENT_TYPE}(,{_EVENT_TYPE})*)?$")  # a comma-separated list
AUDIT_ACTION = TextQuery("action", r"^[^\x00]{0,100}$")  # empty: every action
AUDIT_BEFORE = IntQuery("before", 1, _MAX_ID, 0)  # absent: from the newest
AUDIT_LIMIT = IntQuery("limit", 1, 500, 100)
DELIVERIES_BEFORE = IntQuery("before", 1, _MAX_ID, _MAX_ID)
DELIVERIES_LIMIT = IntQuery("limit", 1, 500, 100)
JOBS_LIMIT = IntQuery("limit", 1, 500, 50)


class HeartbeatIn(Struct, forbid_unknown_fields=False):
    """A device heartbeat. Fields not listed here are kept (as JSON) up to a size limit."""

    sent_at: Annotated[datetime, Meta(tz=True, description="device clock, ISO 8601 with zone")]
    battery_pct: Annotated[int, Meta(ge=0, le=100)]
    charging: bool
    network_type: NetworkType
    app_version: ShortText
    os_version: ShortText
    uptime_s: Annotated[int, Meta(ge=0, le=10**10)]
    free_storage_mb: Annotated[int, Meta(ge=0, le=2**31 - 1)]
    signal_dbm: Annotated[int, Meta(ge=-150, le=0)] | None = None


class HeartbeatAck(Struct):
    status: Literal["stored", "duplicate"]
    device_id: int
    bucket_ts: datetime
    clock_skew_s: float
    skew_corrected: bool


class DeviceIn(Struct, forbid_unknown_fields=True):
    device_uid: DeviceUid
    name: Annotated[str, Meta(max_length=200)] | None = None
    labels: Annotated[list[Label], Meta(max_length=32)] = []


class EnrollBatchIn(Struct, forbid_unknown_fields=True):
    devices: Annotated[list[DeviceIn], Meta(min_length=1, max_length=10_000)]


class EnrolledOut(Struct):
    id: int
    device_uid: str
    token: Annotated[str, Meta(description="bearer token, shown once; only its hash is stored")]


class EnrollOut(Struct):
    devices: list[EnrolledOut]


class TokenOut(Struct):
    device_id: int
    token: str
    previous_token_valid_until: datetime


class RevokeOut(Struct):
    device_id: int
    revoked_at: datetime


class DeviceStatus(Struct):
    id: int
    device_uid: str
    name: str | None
    labels: list[str]
    enrolled_at: datetime
    revoked_at: datetime | None
    online: bool
    last_seen_at: datetime | None
    sent_at: datetime | None
    bucket_ts: datetime | None
    clock_skew_s: float | None
    battery_pct: int | None
    charging: bool | None
    network_type: str | None
    signal_dbm: int | None
    app_version: str | None
    os_version: str | None
    uptime_s: int | None
    free_storage_mb: int | None


ReadSourceName = Annotated[
    Literal["primary", "replica"],
    Meta(description="where the read was answered: the streaming replica, or the primary (no replica "
                     "configured, or it lags more than READ_MAX_LAG_S, or it cannot be reached)"),
]
ReplicaLag = Annotated[
    float | None, Meta(description="the replica's lag bound in seconds at the time (null: no replica, or unreachable)")
]


class DeviceStatusRead(DeviceStatus):
    """GET /v1/devices/<id>: the device's status, and where it was read."""

    source: ReadSourceName
    replica_lag_s: ReplicaLag


class DeviceList(Struct):
    devices: list[DeviceStatus]
    next_after: Annotated[int | None, Meta(description="pass as ?after= for the next page")]
    source: ReadSourceName
    replica_lag_s: ReplicaLag


class FleetSummary(Struct):
    total: int
    online: int
    offline: int
    never_seen: int
    revoked: int
    charging: int
    offline_over_1h: Annotated[int, Meta(description="seen before, silent for over an hour")]
    offline_over_24h: Annotated[int, Meta(description="seen before, silent for over a day")]
    battery: dict[str, int]
    app_versions: dict[str, int]
    as_of: datetime
    source: ReadSourceName
    replica_lag_s: ReplicaLag


class HeartbeatRecord(Struct):
    device_id: int
    bucket_ts: datetime
    sent_at: datetime
    received_at: datetime
    clock_skew_s: float
    battery_pct: int
    charging: bool
    network_type: str
    signal_dbm: int | None
    app_version: str
    os_version: str
    uptime_s: int
    free_storage_mb: int
    extra: dict[str, Any] | None


class HistoryPageRange(Struct):
    since: datetime
    until: datetime


class HeartbeatHistory(Struct):
    device_id: int
    since: datetime
    until: datetime
    heartbeats: list[HeartbeatRecord]
    source: ReadSourceName
    replica_lag_s: ReplicaLag
    next: Annotated[HistoryPageRange | None, Meta(
        description="since/until of the next page (same order and limit); null on the last page")] = None


class Error(Struct):
    error: Annotated[str, Meta(description="machine-readable code")]
    detail: Any


class Health(Struct):
    status: str
    database: str | None = None


encoder = msgspec.json.Encoder()
json_decoder = msgspec.json.Decoder()


class JobRun(Struct):
    """One run of a scheduled job (job_runs), or the report of a run just made."""

    run_id: int | None
    job: str
    status: Literal["running", "succeeded", "failed", "skipped"]
    trigger: str | None
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    rows_affected: int | None
    detail: dict[str, Any] | None
    error: str | None


class JobRunList(Struct):
    runs: list[JobRun]


EventType = Literal["device_offline", "device_online", "battery_low", "battery_critical", "app_version_changed",
                    "token_revoked"]


class Event(Struct):
    """One transition of one device, as recorded by the events job."""

    id: int
    type: EventType
    device_id: int
    occurred_at: datetime
    detail: dict[str, Any]


class EventList(Struct):
    events: list[Event]
    next_after: Annotated[int | None, Meta(description="oldest-first pages: pass as ?after= for the next page")]
    next_before: Annotated[int | None, Meta(description="newest-first pages (?before=): pass as ?before=")]
    source: ReadSourceName
    replica_lag_s: ReplicaLag


WebhookUrl = Annotated[str, Meta(min_length=8, max_length=2048, pattern=r"^https?://[^\s/?#]+[^\s]*$")]


class WebhookIn(Struct, forbid_unknown_fields=True):
    url: WebhookUrl
    event_types: Annotated[list[EventType], Meta(max_length=6, description="empty: every type")] = []
    secret: Annotated[str, Meta(min_length=16, max_length=256,
                                description="HMAC key; generated (and shown once) when absent")] | None = None


class Webhook(Struct):
    id: int
    url: str
    event_types: list[str]
    created_at: datetime
    cursor_event_id: int
    pending_deliveries: int = 0


class WebhookCreated(Struct):
    id: int
    url: str
    event_types: list[str]
    created_at: datetime
    cursor_event_id: int
    secret: Annotated[str, Meta(description="the signing secret, shown once")]


class WebhookList(Struct):
    webhooks: list[Webhook]


class WebhookDeleted(Struct):
    id: int
    deleted_at: datetime


class DeliveryAttempt(Struct):
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: float


class WebhookDelivery(Struct):
    id: int
    webhook_id: int
    idempotency_key: str
    status: Literal["pending", "delivered", "failed", "cancelled"]
    event_count: int
    first_event_id: int
    last_event_id: int
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    attempt_log: list[DeliveryAttempt]


class WebhookDeliveryList(Struct):
    deliveries: list[WebhookDelivery]
    next_before: Annotated[int | None, Meta(description="pass as ?before= for older deliveries")]


Role = Literal["viewer", "operator", "admin"]
KeyName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*(?!\n)$")]


class KeyIn(Struct, forbid_unknown_fields=True):
    """A named operator key to create: viewer (reads, metrics, pool health), operator (also jobs,
    token rotation and revocation), admin (also enrollment and keys)."""

    name: KeyName
    role: Role


class OperatorKeyOut(Struct):
    id: int
    name: str
    role: Role
    created_at: datetime
    created_by: str
    revoked_at: datetime | None


class KeyCreatedOut(OperatorKeyOut):
    """A key just created: its record and, this once, the key itself."""

    key: Annotated[str, Meta(description="the operator key (send as x-admin), shown once; only its hash is stored")]


class KeyList(Struct):
    keys: list[OperatorKeyOut]


class AuditEntryOut(Struct):
    id: int
    at: datetime
    actor: Annotated[str, Meta(description="the key's name; ADMIN_KEY for the bootstrap key")]
    actor_key_id: int | None
    actor_role: Role
    action: str
    target: str | None
    source_addr: str | None
    outcome: Literal["ok", "denied", "failed"]
    detail: dict[str, Any] | None


class AuditPage(Struct):
    entries: list[AuditEntryOut]
    next_before: int | None


# GET /ops/pool_health. The thresholds it judges by are api.contract's POOL_WARN_PCT and
# POOL_CRITICAL_PCT; api/pool_health.py fills these in.
class PoolFigures(Struct):
    """Every live worker's pool, summed; utilisation = in use / (size + max overflow)."""

    workers: int
    pool_size: int
    max_overflow: int
    capacity: int
    in_use: int
    overflow: int
    utilization_pct: float
    busiest_worker_utilization_pct: float


class PostgresFigures(Struct):
    max_connections: int
    reserved_connections: int
    in_use: int
    in_use_by_nexmdm: int
    headroom: int
    utilization_pct: float


class PostgresCpu(Struct):
    """CPU time PostgreSQL has used so far (postmaster, its live backends and the ones it has
    reaped), read from its processes on this host; a rate of it is PostgreSQL's CPU use."""

    seconds: float
    host_cpus: int
    source: str


class PoolHealth(PoolFigures):
    """GET /ops/pool_health: the pool figures of every live worker of both planes (PoolFigures'
    fields), each plane's (``planes``), then PostgreSQL's, then the judgement. ``pool`` repeats
    the whole server's pool figures as one object, so the seed's monitoring command
    (``jq .pool.utilization_pct``) works as written."""

    planes: dict[str, PoolFigures]
    pool: PoolFigures
    status: PoolStatus
    reasons: list[str]
    postgres: PostgresFigures | None
    postgres_error: str | None
    postgres_cpu: PostgresCpu | None
    postgres_cpu_note: str | None
    warn_pct: float
    critical_pct: float
    as_of: datetime
