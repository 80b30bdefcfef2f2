"""The Events panel shows fleet events live, a burst as one loud line; sources are pluggable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from console.sources.feed import BURST, INFO, FeedLine, FleetEventsSource, event_lines
from console.sources.http import ApiClient
from console.widgets.events import feed_markup
from db.heartbeats import insert_heartbeats
from scheduler.service import run_job
from tests.console.test_app import SIZE, events_text, make_app, pilot_test, wait_for
from tests.support.jobdata import make_devices, row


def test_a_burst_is_one_line_and_the_rest_one_line_each():
    at = "2026-12-01T03:00:00+00:00"
    events = [{"id": i, "type": "device_offline", "device_id": i, "occurred_at": at, "detail": {}}
              for i in range(1, 16)]
    events += [{"id": 16, "type": "battery_critical", "device_id": 7, "occurred_at": at, "detail": {"battery_pct": 6}},
               {"id": 17, "type": "app_version_changed", "device_id": 8, "occurred_at": at,
                "detail": {"from": "1.0", "to": "1.1"}}]
    lines = event_lines(events)
    assert [(ln.severity, ln.text, ln.count) for ln in lines] == [
        (BURST, "15 devices went offline (device_offline)", 15),
        ("alert", "device 7 battery critical (6 %)", 1),
        (INFO, "device 8 changed app version (1.0 → 1.1)", 1),
    ]
    assert feed_markup(lines[0]) == ("▲ fleet: 15 devices went offline (device_offline)", "bold reverse red")
    assert event_lines(events[:9])[0].text == "device 1 went offline"  # nine are not a burst


class AuditStub:
    """Another source, as the audit log will be: the panel takes its lines the same way."""

    name = "audit"

    def __init__(self) -> None:
        self.lines = [FeedLine(datetime(2026, 12, 1, 3, tzinfo=UTC), "audit", INFO, "operator key k1 created")]

    def poll(self) -> list[FeedLine]:
        lines, self.lines = self.lines, []
        return lines


@pilot_test
async def test_events_panel_shows_an_offline_burst_live(live_server, engine, settings, tmp_path):
    devices = make_devices(engine, 30)
    t0 = datetime.now(UTC).replace(microsecond=0)
    with engine.begin() as conn:
        insert_heartbeats(conn, [row(d, t0) for d in devices[:12]])
    run_job("events", engine, settings, now=t0, progress=lambda line: None)  # 12 came online

    app = make_app(live_server.admin_url, live_server.admin_key, tmp_path)
    app.poller.feeds.append(AuditStub())
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "12 devices came online" in events_text(app), what="the first look")
        assert "audit: operator key k1 created" in events_text(app)
        source = app.poller.feeds[0]
        assert isinstance(source, FleetEventsSource) and source.cursor == 12
        # A carrier outage: the twelve go silent; the next run records them at once.
        run_job("events", engine, settings, now=t0 + timedelta(minutes=5), progress=lambda line: None)
        await wait_for(pilot, lambda: "▲ fleet: 12 devices went offline (device_offline)" in events_text(app),
                       what="the burst line")
        with engine.begin() as conn:
            insert_heartbeats(conn, [row(devices[0], t0 + timedelta(minutes=6), battery=4)])
        run_job("events", engine, settings, now=t0 + timedelta(minutes=6), progress=lambda line: None)
        await wait_for(pilot, lambda: f"device {devices[0]} battery critical (4 %)" in events_text(app),
                       what="a single event")
        assert f"device {devices[0]} came online" in events_text(app)
        assert events_text(app).count("went offline") == 1  # each event shown once

    # A burst bigger than a page is followed page by page within one poll (same server).
    source = FleetEventsSource(ApiClient(live_server.admin_url, live_server.admin_key), page=5, max_pages=10)
    source.cursor = 0
    with engine.begin() as conn:
        insert_heartbeats(conn, [row(d, t0 + timedelta(minutes=7)) for d in devices[12:]])
    run_job("events", engine, settings, now=t0 + timedelta(minutes=7), progress=lambda line: None)
    lines = source.poll()
    burst = [ln for ln in lines if ln.severity == BURST and "came online" in ln.text and ln.count == 18]
    assert len(burst) == 1, lines  # the 18 new devices, across four pages, as one line
    assert source.poll() == []

