"""SVG snapshots of the console's main screen at fixed sizes, from deterministic data
(tests/console/scenes.py). Update with ``pytest tests/console --snapshot-update`` and review the SVGs."""

from __future__ import annotations

from pathlib import Path

from console.app import ConsoleApp, ServerPolled, SimulatorEvent
from console.sources.simulator import SimExited, SimParams, SimReport
from console.widgets.simulator import RUNNING, SimView
from tests.console.scenes import T0, down_snapshot, polls, sim_progress


def scene_app() -> ConsoleApp:
    return ConsoleApp("http://127.0.0.1:8000", "key", output_dir=Path("var/console"), autopoll=False,
                      offer_local_server=False, clock=lambda: T0)


async def load_test_in_progress(pilot) -> None:
    app = pilot.app
    for snapshot in polls(90):
        app.post_message(ServerPolled(snapshot))
    for name, value in (("devices", "2000"), ("duration", "60"), ("interval", "10"), ("jitter", "2")):
        app.query_one(f"#sim-{name}").value = value
    app._show_sim(SimView(state=RUNNING, params=SimParams(2000, 60, 10, 2)))
    for progress in sim_progress(20):
        app.post_message(SimulatorEvent(progress))
    await pilot.pause()
    await pilot.pause()


async def load_test_finished(pilot) -> None:
    await load_test_in_progress(pilot)
    app = pilot.app
    app.sim.report_path = Path("var/console/sim-20261127-120000.json")  # as SimulatorProcess.start sets it
    app.post_message(SimulatorEvent(SimReport("PASS", True)))
    app.post_message(SimulatorEvent(SimExited(0, "", "var/console/sim-20261127-120000.log", False)))
    await pilot.pause()
    await pilot.pause()


async def server_down(pilot) -> None:
    pilot.app.post_message(ServerPolled(down_snapshot()))
    await pilot.pause()
    await pilot.pause()


def test_main_screen_80x24_during_a_load_test(snap_compare):
    assert snap_compare(scene_app(), terminal_size=(80, 24), run_before=load_test_in_progress)


def test_main_screen_120x36_after_a_load_test(snap_compare):
    assert snap_compare(scene_app(), terminal_size=(120, 36), run_before=load_test_finished)


def test_main_screen_80x24_server_down(snap_compare):
    assert snap_compare(scene_app(), terminal_size=(80, 24), run_before=server_down)
