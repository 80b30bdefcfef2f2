"""Lines for the console's Events panel from the server: fleet events (GET /v1/events), the
audit trail of operator changes (GET /v1/audit), and any other source with the same small
interface (``FeedSource``: a name and ``poll() -> lines``).

A source keeps its own cursor, so each poll returns only what is new. Fleet events that one job
run recorded together (same time, same type) come as one line when there are many of them, so
an outage of 15,000 devices is one loud line instead of 15,000 quiet ones.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from console.sources.http import AUTH, UNAVAILABLE, ApiClient, EndpointError

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


class _PagedFeed:
    """A feed read by keyset pages since the last poll. An endpoint that answers one of
    ``QUIET_KINDS`` (missing, or not for this key) is remembered and not asked again."""

    name = "feed"
    QUIET_KINDS: tuple[str, ...] = (UNAVAILABLE,)

    def __init__(self, client: ApiClient, *, page: int = PAGE, max_pages: int = MAX_PAGES_PER_POLL) -> None:
        self.client = client
        self.page = page
        self.max_pages = max_pages
        self.cursor: int | None = None
        self.unavailable = False

    def poll(self) -> list[FeedLine]:
        """Lines for what was recorded since the last poll."""
        if self.unavailable:
            return []
        try:
            return self._new_lines()
        except EndpointError as err:
            if err.kind in self.QUIET_KINDS:
                self.unavailable = True
                return []
            raise

    def _new_lines(self) -> list[FeedLine]:
        raise NotImplementedError


class FleetEventsSource(_PagedFeed):
    """New fleet events since the last poll, keyset-paginated on event id. The first poll shows
    the few most recent; a server without /v1/events is remembered and not asked again."""

    name = "fleet"

    def _new_lines(self) -> list[FeedLine]:
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


def audit_lines(entries: list[dict[str, Any]], source: str = "audit") -> list[FeedLine]:
    """Audit rows (oldest first) as panel lines: who did what to what, from where; a refused
    or failed change is louder than one that was done."""
    lines = []
    for e in entries:
        outcome = str(e.get("outcome"))
        severity = INFO if outcome == "ok" else (ALERT if outcome == "denied" else WARN)
        target = f" {e['target']}" if e.get("target") else ""
        said = "" if outcome == "ok" else f" {outcome.upper()}"
        lines.append(FeedLine(_time(e.get("at")), source, severity,
                              f"{e.get('actor')} ({e.get('actor_role')}) {e.get('action')}{target}{said}"
                              f" from {e.get('source_addr') or '?'}"))
    return lines


class AuditSource(_PagedFeed):
    """New audit rows (GET /v1/audit, newest first, keyset on id) since the last poll. The first
    poll shows the few most recent. A key that may not read the audit (viewer, operator) or a
    server without it is remembered and not asked again."""

    name = "audit"
    QUIET_KINDS = (UNAVAILABLE, AUTH)

    def __init__(self, client: ApiClient, *, page: int = 100, max_pages: int = 20) -> None:
        super().__init__(client, page=page, max_pages=max_pages)

    def _new_lines(self) -> list[FeedLine]:
        limit = FIRST_LOOK if self.cursor is None else self.page
        newest: list[dict[str, Any]] = []
        before: int | None = None
        for _ in range(1 if self.cursor is None else self.max_pages):
            query = f"/v1/audit?limit={limit}" + (f"&before={before}" if before else "")
            body = self.client.get_json(query)
            batch = [e for e in body.get("entries") or [] if self.cursor is None or int(e["id"]) > self.cursor]
            newest += batch
            before = body.get("next_before")
            if before is None or self.cursor is None or before <= self.cursor:
                break
        self.cursor = max([int(e["id"]) for e in newest] + [self.cursor or 0])
        return audit_lines(list(reversed(newest)), self.name)
