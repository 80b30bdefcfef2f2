"""What one worker holds for the app's lifetime: settings, engine, caches, the writer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from sqlalchemy import Engine

from api.auth import TokenCache
from api.clients import Networks
from api.group_commit import GroupCommitWriter
from api.metrics import JobMetrics, ReplicaGauges, observe_flush
from api.throttle import DeviceRateLimit, FailureThrottle
from config.settings import Settings
from db.cold import ColdReader
from db.reads import ReadRouter


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    admin_key: str  # the bootstrap admin key (ADMIN_KEY): api.auth.requires_role checks it
    tokens: TokenCache
    reads: ReadRouter  # the operator plane's reads: the replica when fresh enough, else the primary
    trusted_proxies: Networks = ()
    auth_failures: FailureThrottle = field(default_factory=lambda: FailureThrottle(0, 60.0))
    device_limit: DeviceRateLimit = field(default_factory=lambda: DeviceRateLimit(0))
    cold: ColdReader | None = None  # the Parquet days (db/cold.py); None: hot tier only
    job_metrics: JobMetrics = field(default_factory=JobMetrics)  # every job run this app makes or schedules
    replica_gauges: ReplicaGauges = field(default_factory=ReplicaGauges)  # its lag guard's measurements
    _writer: GroupCommitWriter | None = None
    summary_cache: tuple[float, Any] | None = None
    summary_refreshing: bool = False
    started_mono: float = field(default_factory=time.monotonic)

    @property
    def started_writer(self) -> GroupCommitWriter | None:
        """The writer if a heartbeat has created it, else None (for samplers, which must not)."""
        return self._writer

    @property
    def writer(self) -> GroupCommitWriter:
        """The heartbeat writer; created on first use, inside the worker, so its greenlets
        belong to the worker's hub (or, in-process, to the calling thread's)."""
        if self._writer is None:
            self._writer = GroupCommitWriter(self.engine, self.settings, observe_flush)
        return self._writer

    def close(self) -> None:
        """Stop the writer (if one was started) and close its connections."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def current_state() -> AppState:
    """The AppState of the running app."""
    return current_app.extensions["nexmdm"]
