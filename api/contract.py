"""Names and numbers the server's clients rely on, beside its JSON schemas (api/schemas.py): the
Prometheus metric names the console decodes, the service-level targets the simulator checks and
the console draws, and the thresholds /ops/pool_health judges by. Each is written here once.

Imports nothing of the server (no Flask, no database), so any client may import it.
"""

from __future__ import annotations

from typing import Literal

PREFIX = "nexmdm"

# GET /metrics. A histogram's samples are <name>_bucket{le=...}, <name>_count and <name>_sum.
HEARTBEAT_WRITE_SECONDS = f"{PREFIX}_heartbeat_write_duration_seconds"
HEARTBEATS_ACCEPTED = f"{PREFIX}_heartbeats_accepted_total"
HEARTBEATS_DUPLICATE = f"{PREFIX}_heartbeats_duplicate_total"
HEARTBEATS_REJECTED = f"{PREFIX}_heartbeats_rejected_total"  # label reason: the answer's error code
HTTP_REQUESTS = f"{PREFIX}_http_request_total"  # every request but POST /v1/heartbeat; label status

# Service-level targets: the seed's (DESIGN.md), the floor rather than the goal.
HEARTBEAT_P95_MS = 150.0
HEARTBEAT_P99_MS = 300.0
READ_P95_MS = 20.0
ERROR_PCT = 0.5

# Pool utilisation (in use / (size + max overflow)): WARN above the first, CRITICAL above the
# second. Sustained use above POOL_WARN_PCT also fails the simulator's pool SLI.
POOL_WARN_PCT = 80.0
POOL_CRITICAL_PCT = 95.0
PoolStatus = Literal["OK", "WARN", "CRITICAL"]


def pool_status(utilization_pct: float) -> PoolStatus:
    """OK up to POOL_WARN_PCT, WARN above it, CRITICAL above POOL_CRITICAL_PCT."""
    if utilization_pct > POOL_CRITICAL_PCT:
        return "CRITICAL"
    if utilization_pct > POOL_WARN_PCT:
        return "WARN"
    return "OK"
