"""Snapshots of the set-up screen, the dashboard mid-run (from recorded metrics), a long phase's progress and
the inspection view, at 80×24, 120×40 and 160×48 (the wide layout). Nothing may be cut at any of them: the
status line wraps, the log wraps before its scrollbar. Update them deliberately with `pytest --snapshot-update`
after a reviewed change."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input

import tui.setup
from core.config import config_from_dict, read_yaml
from core.events import event_from_json
from core.metrics import read_metrics as read_events
from models.tiny_chat import CONFIG_FILE
from tui.app import DuetApp
from tui.dashboard import DashboardScreen
from tui.inspect_view import InspectScreen

RECORDED = Path(__file__).parent / "fixtures" / "recorded_run" / "metrics.jsonl"
SIZES = [(80, 24), (120, 40), (160, 48)]
IDS = ["80x24", "120x40", "160x48"]


def demo_config():
    # as written in the file: no machine-specific absolute paths in the picture
    return config_from_dict(read_yaml(CONFIG_FILE)).validate()


class ScreenApp(DuetApp):
    """The app opened straight on one screen."""

    def __init__(self, make_screen) -> None:
        super().__init__()
        self.make_screen = make_screen

    def on_mount(self, event) -> None:
        event.prevent_default()
        self.push_screen(self.make_screen())


async def steady(pilot) -> None:
    for widget in pilot.app.screen.query(Input):
        widget.cursor_blink = False
    await pilot.pause(0.3)


@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_setup_screen(snap_compare, monkeypatch, size) -> None:
    monkeypatch.setattr(tui.setup, "backend_note", lambda: "auto → torch   (torch: cpu; mlx: Device(cpu, 0))")
    assert snap_compare(DuetApp(demo_config(), source="models/demo/run.yaml"), terminal_size=size, run_before=steady)


@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_dashboard_mid_run(snap_compare, size) -> None:
    events = read_events(RECORDED)
    mid_run = [e for e in events if e.get("step", 0) <= 25 and e["type"] not in ("end", "stopped")]
    assert snap_compare(ScreenApp(lambda: DashboardScreen(replay=mid_run)), terminal_size=size, run_before=steady)


@pytest.mark.parametrize("size", SIZES[:2], ids=IDS[:2])
def test_dashboard_long_phase_progress(snap_compare, size) -> None:
    events = read_events(RECORDED)[:2]
    progress = {"type": "progress", "phase": "reference", "done": 120, "total": 270, "unit": "pairs"}
    events.append(event_from_json({**progress, "elapsed": 30.0, "eta": 42.0, "message": "reference log-probs"}))
    assert snap_compare(ScreenApp(lambda: DashboardScreen(replay=events)), terminal_size=size, run_before=steady)


@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_inspection_view(snap_compare, size) -> None:
    config = demo_config()

    async def loaded(pilot) -> None:
        screen = pilot.app.screen
        for _ in range(200):
            if screen.inspection is not None:
                break
            await pilot.pause(0.05)
        await pilot.press("n")  # the second pair: navigation works
        await pilot.pause(0.3)

    assert snap_compare(ScreenApp(lambda: InspectScreen(config)), terminal_size=size, run_before=loaded)
