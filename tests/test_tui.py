"""The terminal UI, driven by Textual's pilot: set-up → train → pause → resume → stop → export; watch mode;
a crash shown, not fatal; key presses handled fast while training runs."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from textual import events
from textual.binding import Binding, BindingType
from textual.widgets import Input, RadioSet

from backends.torch_backend.backend import TorchBackend
from core.rundir import RunDirectory
from tests.helpers import DEMO_MODEL, quick_config
from tui.app import DuetApp
from tui.dashboard import DashboardScreen
from tui.dialogs import ConfirmDialog, ExportDialog
from tui.setup import SetupScreen

RECORDED = Path(__file__).parent / "fixtures" / "recorded_run" / "metrics.jsonl"


async def wait_for(pilot, condition, timeout: float = 60.0, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        await pilot.pause(step)


def dashboard(app) -> DashboardScreen:
    screen = app.screen
    assert isinstance(screen, DashboardScreen), type(screen)
    return screen


async def test_setup_train_pause_resume_stop_and_export(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = quick_config(tmp_path, train={"max_steps": 200, "eval_every": 10})
    app = DuetApp(config, source="a test")
    async with app.run_test(size=(100, 30)) as pilot:
        assert isinstance(app.screen, SetupScreen)
        app.screen.query_one("#f-train-lr", Input).value = "0.002"  # an edit on the form reaches the run
        await pilot.press("f5")
        board = dashboard(app)
        await wait_for(pilot, lambda: board.state.step >= 3)
        assert board.state.train["loss"].values and board.state.phase == "training"
        assert board.session.config.train.lr == 0.002

        await pilot.press("p")
        await wait_for(pilot, lambda: board.state.phase == "paused")
        paused_at = board.state.step
        await pilot.pause(0.5)
        assert board.state.step == paused_at  # nothing trains while paused

        await pilot.press("p")
        await wait_for(pilot, lambda: board.state.step > paused_at + 2)

        await pilot.press("c")
        await wait_for(pilot, lambda: board.state.last_checkpoint is not None)

        await pilot.press("s")
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.click("#yes")
        await wait_for(pilot, lambda: board.state.phase == "stopped")
        assert board.state.last_checkpoint and Path(board.state.last_checkpoint).is_dir()

        await pilot.press("e")
        assert isinstance(app.screen, ExportDialog)
        out = tmp_path / "exported"
        app.screen.query_one("#out", Input).value = str(out)
        assert app.screen.query_one("#format", RadioSet).pressed_button.id == "peft"
        await pilot.click("#go")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert (out / "adapter_model.safetensors").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL), out)
    assert any("lora_A" in name for name, _ in model.named_parameters())


async def test_try_it_generates_with_the_adapter_off_and_on(tmp_path: Path) -> None:
    from tui.dialogs import TryItPanel

    app = DuetApp(quick_config(tmp_path, train={"max_steps": 3}), source="a test")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f5")
        board = dashboard(app)
        await wait_for(pilot, lambda: board.state.phase == "finished")
        await pilot.press("t")
        assert isinstance(app.screen, TryItPanel)
        app.screen.query_one("#prompt", Input).value = "Name a color."
        await pilot.press("enter")
        panel = app.screen
        await wait_for(pilot, lambda: "generating" not in str(panel.query_one("#tuned").render()))
        base = str(panel.query_one("#base").render())
        assert base.startswith("Oh")  # the SFT model rambles; the tuned reply is shown beside it


async def test_a_crash_in_training_is_shown_and_the_app_lives_on(tmp_path: Path, monkeypatch) -> None:
    original = TorchBackend.forward_backward
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated device failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TorchBackend, "forward_backward", flaky)
    app = DuetApp(quick_config(tmp_path, train={"max_steps": 20, "save_every": 2}), source="a test")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f5")
        board = dashboard(app)
        await wait_for(pilot, lambda: board.state.phase == "failed")
        log = "\n".join(board.logged)
        assert "training failed: RuntimeError: simulated device failure" in log
        assert "the last checkpoint is intact" in log and board.state.last_checkpoint.endswith("step-00000004")
        await pilot.press("e")  # the app still works: export from the last checkpoint
        assert isinstance(app.screen, ExportDialog)
        await pilot.press("escape")
        assert isinstance(app.screen, DashboardScreen)


async def test_watch_mode_on_a_recorded_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo-run"
    run_dir.mkdir()
    shutil.copy(RECORDED, run_dir / "metrics.jsonl")
    app = DuetApp(watch=run_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        board = dashboard(app)
        await wait_for(pilot, lambda: board.state.phase == "finished")
        assert board.state.step == 40 and len(board.state.train["loss"].values) == 40
        assert board.state.eval["rewards/accuracies"].steps == [10, 20, 30, 40]
        assert not board.check_action("pause", ()) and not board.check_action("stop", ())  # read-only


async def test_watch_mode_follows_a_growing_file_and_notices_a_dead_run(tmp_path: Path) -> None:
    lines = RECORDED.read_text().splitlines(keepends=True)
    run_dir = tmp_path / "growing"
    app = DuetApp(watch=run_dir)  # the run has not even created its folder yet
    async with app.run_test(size=(100, 30)) as pilot:
        board = dashboard(app)
        await pilot.pause(0.6)
        assert board.state.phase == "waiting" and board.state.events == 0
        run_dir.mkdir()
        holder = RunDirectory(run_dir, "x")
        with holder.lock():  # a live process holds the lock while it writes
            metrics = run_dir / "metrics.jsonl"
            with open(metrics, "w") as handle:
                for line in lines[:10]:
                    handle.write(line)
                handle.write(lines[10][:25])  # a line being written: not read until complete
                handle.flush()
                await wait_for(pilot, lambda: board.state.events == 10)
                handle.write(lines[10][25:])
                for line in lines[11:30]:
                    handle.write(line)
                handle.flush()
                await wait_for(pilot, lambda: board.state.events == 30)
            assert board.state.phase == "training"
        # the writer is gone (lock released) without an end event: a crashed or killed run
        await wait_for(pilot, lambda: board.state.phase == "not running")
        log = "\n".join(board.logged)
        assert "no process is running this run" in log and f"--resume {run_dir}" in log


@pytest.mark.slow
async def test_key_presses_are_handled_within_100ms_while_the_demo_trains(tmp_path: Path) -> None:
    handled: list[float] = []

    class ProbeDashboard(DashboardScreen):
        BINDINGS: ClassVar[list[BindingType]] = [*DashboardScreen.BINDINGS, Binding("f9", "probe", show=False)]

        def action_probe(self) -> None:
            handled.append(time.perf_counter())

    from core.run import resolve_config
    from tui.session import TrainingSession

    # the demo's workload, with enough steps that it is still training when the presses are done
    config = resolve_config(
        None, [f"train.output_dir={tmp_path / 'runs'}", f"train.cache_dir={tmp_path / 'cache'}", "train.max_steps=2000"]
    )

    class ProbeApp(DuetApp):
        def on_mount(self, event) -> None:
            event.prevent_default()  # not DuetApp's set-up screen: straight to the dashboard
            self.push_screen(ProbeDashboard(session=TrainingSession(config)))

    torch.set_num_threads(2)
    app = ProbeApp()
    latencies = []
    async with app.run_test(size=(100, 30)) as pilot:
        board = app.screen
        await wait_for(pilot, lambda: board.state.step >= 5, timeout=120)
        for _ in range(25):
            pressed, seen = time.perf_counter(), len(handled)
            # the key event as the terminal driver posts it (the pilot's press also waits for an idle app,
            # which an app receiving training events rarely is)
            app.post_message(events.Key("f9", None))
            while len(handled) == seen and time.perf_counter() - pressed < 5:
                await asyncio.sleep(0.002)
            assert len(handled) > seen, "a key press was never handled"
            latencies.append(handled[-1] - pressed)
            await asyncio.sleep(0.05)
        assert board.state.phase == "training", f"the presses must land while the demo trains; {latencies}"
        board.session.control.request_stop("test over")
        await wait_for(pilot, lambda: board.state.phase == "stopped", timeout=60)
    median = statistics.median(latencies)
    print(f"key press → handler: median {median * 1000:.1f} ms over {len(latencies)} presses")
    assert median < 0.100, latencies


def test_recorded_fixture_is_a_complete_run() -> None:
    events = [json.loads(line) for line in RECORDED.read_text().splitlines()]
    assert events[-1]["type"] == "end" and sum(e["type"] == "train" for e in events) == 40
