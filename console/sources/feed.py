"""Lines for the console's Events panel from the server: fleet events (GET /v1/events), and any
other source with the same small interface (``FeedSource``: a name and ``poll() -> lines``).

A source keeps its own cursor, so each poll returns only what is new. Fleet events that one job
run recorded together (same time, same type) come as one line when there are many of them, so
an outage of 15,000 devices is one loud line instead of 15,000 quiet ones.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from console.sources.http import UNAVAILABLE, ApiClient, EndpointError

INFO, WARN, ALERT, BURST = "info", "warn", "alert", "burst"
BURST_MIN = 10  # events of one type in one run that make a burst line
PAGE = 1000
MAX_PAGES_PER_POLL = 20  # 20,000 events a poll at most; the rest come with the next polls
FIRST_LOOK = 20  # events shown on the first poll (the most recent ones)

_SEVERITY = {"device_offline": WARN, "device_online": INFO, "battery_low": WARN, "battery_critical": ALERT,
             "app_version_changed": INFO, "token_revoked": WARN}
_VERB = {"device_offline": "went offline", "device_online": "came online", "battery_low": "battery low",
         "battery_critical": "battery critical", "app_version_changed": "changed app version",
         "token_revoked": "token revoked"}


@dataclass(frozen=True)
class FeedLine:
    """One line of the Events panel: when, from which source, how loud, what."""

    at: datetime
    source: str
    severity: str  # info | warn | alert | burst
    text: str
    count: int = 1


class FeedSource(Protocol):
    """Anything that can add lines to the Events panel (fleet events here; audit rows later)."""

    name: str

    def poll(self) -> list[FeedLine]:
        """What is new since the last poll (raises EndpointError when the server cannot say)."""
        ...


def _time(raw: Any) -> datetime:
    try:
        value = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        return datetime.now(UTC)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def event_lines(events: list[dict[str, Any]], source: str = "fleet", burst_min: int = BURST_MIN) -> list[FeedLine]:
    """Fleet events as panel lines: a burst (``burst_min`` or more of one type at one time) is
    one line with its count; the others one line each. Oldest first."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        groups[(str(event.get("occurred_at")), str(event.get("type")))].append(event)
    lines: list[tuple[int, FeedLine]] = []
    for (at, kind), members in groups.items():
        first_id = min(int(e.get("id", 0)) for e in members)
        verb = _VERB.get(kind, kind)
        if len(members) >= burst_min:
            lines.append((first_id, FeedLine(_time(at), source, BURST,
                                             f"{len(members):,} devices {verb} ({kind})", len(members))))
            continue
        for e in members:
            detail = e.get("detail") or {}
            extra = ""
            if kind in ("battery_low", "battery_critical") and "battery_pct" in detail:
                extra = f" ({detail['battery_pct']} %)"
            elif kind == "app_version_changed":
                extra = f" ({detail.get('from')} → {detail.get('to')})"
            lines.append((int(e.get("id", 0)), FeedLine(_time(at), source, _SEVERITY.get(kind, INFO),
                                                        f"device {e.get('device_id')} {verb}{extra}")))
    return [line for _, line in sorted(lines, key=lambda pair: pair[0])]


class FleetEventsSource:
    """New fleet events since the last poll, keyset-paginated on event id. The first poll shows
    the few most recent; a server without /v1/events is remembered and not asked again."""

    name = "fleet"

    def __init__(self, client: ApiClient, *, page: int = PAGE, max_pages: int = MAX_PAGES_PER_POLL) -> None:
        self.client = client
        self.page = page
        self.max_pages = max_pages
        self.cursor: int | None = None
        self.unavailable = False

    def poll(self) -> list[FeedLine]:
        """Lines for the events recorded since the last poll."""
        if self.unavailable:
            return []
        try:
            if self.cursor is None:
                body = self.client.get_json(f"/v1/events?order=desc&limit={FIRST_LOOK}")
                events = list(reversed(body.get("events") or []))
                self.cursor = max((int(e["id"]) for e in events), default=0)
                return event_lines(events, self.name)
            events: list[dict[str, Any]] = []
            for _ in range(self.max_pages):
                body = self.client.get_json(f"/v1/events?after={self.cursor}&limit={self.page}")
                batch = body.get("events") or []
                events += batch
                if batch:
                    self.cursor = int(batch[-1]["id"])
                if body.get("next_after") is None:
                    break
            return event_lines(events, self.name)
        except EndpointError as err:
            if err.kind == UNAVAILABLE:
                self.unavailable = True
                return []
            raise
