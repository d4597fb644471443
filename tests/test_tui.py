"""The terminal UI, driven by Textual's pilot: set-up → train → pause → resume → stop → export; watch mode;
a crash shown, not fatal; key presses handled fast while training runs."""

from __future__ import annotations

import asyncio
import itertools
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
from core.events import Event, event_from_json
from core.metrics import read_metrics as read_events
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
        # the run's own error event can set the phase before the worker's failure message arrives
        await wait_for(pilot, lambda: board.state.phase == "failed" and board._ended)
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


async def test_a_thread_move_shows_in_the_log(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo-run"
    run_dir.mkdir()
    lines = RECORDED.read_text().splitlines()
    message = "after step 12: now 1 thread (auto: 2 cores, 1 busy)"
    moved = {"type": "threads", "step": 12, "threads": 1, "message": message}
    lines.insert(len(lines) - 1, json.dumps(moved))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    app = DuetApp(watch=run_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        board = dashboard(app)
        await wait_for(pilot, lambda: board.state.phase == "finished")
        assert ("threads", message) in board.log_lines and ("threads", message) in board.state.log


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


# -- issue 12: what a new user hit in the first hour ---------------------------------------------------------


def recorded_events() -> list[Event]:
    return read_events(RECORDED)


async def test_check_data_and_start_apply_the_same_skip_invalid_rule(tmp_path: Path) -> None:
    from textual.widgets import Select, Static

    rows = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(4)]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([*(json.dumps(r) for r in rows[:2]), "{not json", *(json.dumps(r) for r in rows[2:])]))
    app = DuetApp(quick_config(tmp_path, data={"train": str(data), "eval_fraction": 0.0}), source="a test")
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        report = screen.query_one("#data-report", Static)
        await pilot.press("f2")  # strict, as training will be
        await wait_for(pilot, lambda: "checking" not in str(report.render()))
        assert "invalid JSON" in str(report.render()) and "Skip bad rows" in str(report.render())
        assert screen.current_config().data.skip_invalid is False
        screen.query_one("#f-data-skip_invalid", Select).value = "true"
        await pilot.press("f2")
        await wait_for(pilot, lambda: "skipped 1" in str(report.render()))
        assert screen.current_config().data.skip_invalid is True  # and F5 trains with that rule


async def test_precision_and_recompute_from_the_form_reach_the_run(tmp_path: Path) -> None:
    from textual.widgets import Select

    app = DuetApp(quick_config(tmp_path, train={"max_steps": 3}), source="a test")
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        assert screen.current_config().model.dtype == "auto"
        assert screen.current_config().model.gradient_checkpointing is False
        screen.query_one("#f-model-dtype", Select).value = "bfloat16"
        screen.query_one("#f-model-gradient_checkpointing", Select).value = "true"
        await pilot.press("f5")
        board = dashboard(app)
        await wait_for(pilot, lambda: board.state.run is not None)
        assert board.state.run.dtype == "bfloat16"  # what the backend runs in, as its start event says
        assert board.session.config.model.gradient_checkpointing is True
        await wait_for(pilot, lambda: board.state.phase == "finished")


async def test_try_it_is_offered_only_when_a_model_is_loaded(tmp_path: Path) -> None:
    from tui.dialogs import TryItPanel
    from tui.session import TrainingSession

    config = quick_config(tmp_path, data={"train": str(tmp_path / "missing.jsonl")})
    app = DuetApp(config, source="a test")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f5")
        board = dashboard(app)
        await wait_for(pilot, lambda: board.state.phase == "failed")
        assert not board.check_action("try_it", ())
        await pilot.press("t")
        assert app.screen is board
        panel = TryItPanel(TrainingSession(config))  # even if opened, it never waits for a model forever
        await app.push_screen(panel)
        panel.query_one("#prompt", Input).value = "hi"
        await pilot.press("enter")
        assert "still loading" not in str(panel.query_one("#base").render())


def test_the_status_line_wraps_and_shows_every_figure_at_80_and_120_columns() -> None:
    from tui.state import DashboardState
    from tui.widgets import status_lines

    state = DashboardState()
    for event in recorded_events():
        if event.get("step", 0) <= 25 and event["type"] not in ("end", "stopped"):
            state.apply(event)
    for width in (80, 120):
        lines = [line.plain for line in status_lines(state, "run demo-run", width)]
        assert all(len(line) <= width for line in lines), lines
        text = " ".join(lines)
        figures = ("TRAINING", "step 25/40", "loss 0.", "margin ", "acc ", "tok/s", "ETA ", "mem 0.42 GiB", "lr 3.")
        for figure in figures:
            assert figure in text, (width, figure, lines)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_the_log_wraps_before_its_scrollbar(size) -> None:
    from textual.widgets import RichLog

    class Replay(DuetApp):
        def on_mount(self, event) -> None:
            event.prevent_default()
            self.push_screen(DashboardScreen(replay=recorded_events()))

    app = Replay()
    async with app.run_test(size=size) as pilot:
        await pilot.pause(0.3)
        log = app.screen.query_one("#log", RichLog)
        assert log.max_scroll_y > 0  # the scrollbar is there
        width = log.scrollable_content_region.width
        assert all(line.cell_length <= width for line in log.lines), width
        assert any("step-00000040" in line.text for line in log.lines)  # a path is not cut at the edge


async def test_switching_to_simpo_gives_simpos_beta_unless_typed(tmp_path: Path) -> None:
    from textual.widgets import Select

    from core.run import resolve_config

    assert resolve_config(None, ["objective.name=simpo"]).objective.resolved_beta == 2.0  # the demo recipe too
    app = DuetApp(resolve_config(None, ()), source="the demo")
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        beta = screen.query_one("#f-objective-beta", Input)
        screen.query_one("#f-objective-name", Select).value = "simpo"
        await pilot.pause(0.1)
        assert beta.value == "" and beta.placeholder == "default 2.0"
        assert screen.current_config().objective.resolved_beta == 2.0
        beta.value = "2.5"  # typed: kept across a switch
        screen.query_one("#f-objective-name", Select).value = "dpo"
        await pilot.pause(0.1)
        assert screen.current_config().objective.beta == 2.5
        screen.query_one("#f-objective-name", Select).value = "sft"  # takes no β: even a typed one goes
        await pilot.pause(0.1)
        assert beta.value == "" and beta.placeholder == "no β: leave empty"
        assert screen.current_config().objective.beta is None
    app = DuetApp(quick_config(tmp_path, objective={"beta": 0.1}), source="a file with DPO's default written out")
    async with app.run_test(size=(100, 30)) as pilot:
        app.screen.query_one("#f-objective-name", Select).value = "simpo"
        await pilot.pause(0.1)
        assert app.screen.current_config().objective.resolved_beta == 2.0


async def test_after_a_run_new_run_and_resume_from_the_dashboard(tmp_path: Path) -> None:
    from textual.widgets import Select

    config = quick_config(tmp_path, train={"max_steps": 3, "run_name": "mine"})
    app = DuetApp(config, source="a test")
    async with app.run_test(size=(100, 30)) as pilot:
        app.screen.query_one("#f-train-lr", Input).value = "0.002"
        await pilot.press("f5")
        board = dashboard(app)
        await wait_for(pilot, lambda: board.check_action("new_run", ()))
        assert board.state.phase == "finished" and not board.check_action("resume", ())
        assert "New run" in [command.title for command in app.get_system_commands(board)]
        assert board.source == "run mine"  # not "live" beside FINISHED
        await pilot.press("escape")  # Esc after a run: back to set-up
        setup = app.screen
        assert isinstance(setup, SetupScreen)
        assert setup.query_one("#f-train-run_name", Input).value == "mine-2"  # not the finished run's folder
        assert setup.query_one("#f-train-lr", Input).value == "0.002"  # the settings kept
        setup.query_one("#f-train-max_steps", Input).value = "200"
        setup.query_one("#f-objective-name", Select).value = "dpo"
        await pilot.press("f5")
        board = dashboard(app)
        await wait_for(pilot, lambda: board.state.step >= 3)
        await pilot.press("s", "enter")  # Enter answers the focused "Stop"
        await wait_for(pilot, lambda: board.check_action("resume", ()))
        stopped_at = board.state.step
        assert {"New run", "Resume"} <= {command.title for command in app.get_system_commands(board)}
        await pilot.press("r")
        resumed = dashboard(app)
        assert resumed is not board and resumed.session.resume == tmp_path / "runs" / "mine-2"
        await wait_for(pilot, lambda: resumed.state.step > stopped_at)
        assert resumed.state.train["loss"].steps[:2] == [1, 2]  # the whole history, not from the checkpoint
        await pilot.press("s", "enter")
        await wait_for(pilot, lambda: resumed.check_action("new_run", ()))


async def test_watch_a_resumed_run_forgets_the_old_stop(tmp_path: Path) -> None:
    events = recorded_events()
    history = [e for e in events if e["type"] not in ("end", "stopped") and e.get("step", 0) <= 20]
    stopped = event_from_json(
        {"type": "stopped", "step": 20, "message": "stopped at step 20/40 (test); resume with: ..."}
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(e.to_json()) + "\n" for e in [*history, stopped]))
    app = DuetApp(watch=run_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        board = dashboard(app)
        await wait_for(pilot, lambda: board.state.phase == "stopped")
        start = next(e for e in events if e["type"] == "start")
        resumed = [event_from_json({**start.to_json(), "resumed": True, "start_step": 20, "time": 1.0})]
        later = [e for e in events if e["type"] == "train" and 20 < e["step"] <= 30]
        # cut back to the checkpoint and grown past the old end between two reads
        metrics.write_text("".join(json.dumps(e.to_json()) + "\n" for e in [*history, *resumed, *later]))
        with RunDirectory(run_dir, "x").lock():
            await wait_for(pilot, lambda: board.state.step == 30)
            assert board.state.phase == "training"
            assert not any("stopped at" in line for line in board.logged)
            assert board.state.train["loss"].steps == list(range(1, 31))


def test_watch_a_typo_says_so_and_lists_runs_nearby(tmp_path: Path, capsys, monkeypatch) -> None:
    from core.cli import main

    for name in ("demo-run", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("{}")
    (tmp_path / "not-a-run").mkdir()
    assert main(["watch", str(tmp_path / "demo-rum")]) == 2
    error = capsys.readouterr().err
    assert "does not exist" in error and str(tmp_path / "demo-run") in error and "not-a-run" not in error
    assert "--wait" in error
    opened = []
    monkeypatch.setattr(DuetApp, "run", lambda self: opened.append(self.watch))
    assert main(["watch", "--wait", str(tmp_path / "later")]) == 0 and opened == [tmp_path / "later"]


async def test_quit_keys_and_confirm_dialogs(tmp_path: Path) -> None:
    from textual.widgets import Button, Static

    app = DuetApp(quick_config(tmp_path), source="a test")
    async with app.run_test(size=(80, 24)) as pilot:
        footer_keys = {active.binding.key for active in app.screen.active_bindings.values() if active.binding.show}
        assert "ctrl+q" in footer_keys
        dialog = ConfirmDialog("Stop training?", yes="Stop", no="Keep training")
        await app.push_screen(dialog)
        await pilot.pause()
        assert app.focused.id == "yes"
        hints = str(dialog.query_one(".keys", Static).render())
        assert "Enter" in hints and "Esc" in hints
        await pilot.press("n")
        assert isinstance(app.screen, SetupScreen)
        app.screen.query_one("#start", Button).focus()
        await pilot.press("q")  # with no text field focused, q quits the set-up screen
        await pilot.pause()
    assert app.return_code == 0 and not app.is_running


def test_margin_histogram_has_even_count_ticks_and_no_legend_over_the_bars() -> None:
    from tui.state import DashboardState
    from tui.widgets import count_ticks, histogram_lines

    for top in range(1, 60):
        ticks = count_ticks(top)
        assert ticks[0] == 0 and ticks[-1] >= top and len({b - a for a, b in itertools.pairwise(ticks)}) == 1
    state = DashboardState(margins=[-0.2, 0.1, 0.1, 0.3, 0.5, 0.5, 0.5], eval_margins=[0.0, 0.2, 0.4])
    lines = [line.plain for line in histogram_lines(state, 30, 9)]
    assert all(len(line) <= 30 for line in lines), lines
    title = " ".join(lines[:2])
    assert "■ eval" in title and "■ batch" in title
    bars = [line for line in lines if line[1:2] in "┤│"]
    assert [line[0] for line in bars if line[0] != " "] == ["3", "0"]  # the axis: the top count and zero only
    assert all(set(line[2:]) <= set(" ▁▂▃▄▅▆▇█│") for line in bars)


async def test_an_idle_watch_redraws_nothing(tmp_path: Path, monkeypatch) -> None:
    from tui.widgets import MetricChart

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(RECORDED.read_text().splitlines(keepends=True)[:20]))
    with RunDirectory(run_dir, "x").lock():  # alive, between two long steps
        app = DuetApp(watch=run_dir)
        async with app.run_test(size=(100, 30)) as pilot:
            board = dashboard(app)
            await wait_for(pilot, lambda: board.state.events == 20)
            await pilot.pause(0.5)
            draws = []
            monkeypatch.setattr(MetricChart, "draw", lambda self, state: draws.append(self.chart))
            await pilot.pause(1.5)
            assert draws == [] and board.state.phase == "training"


async def test_export_defaults_to_a_folder_inside_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "demo-run"
    run_dir.mkdir(parents=True)
    shutil.copy(RECORDED, run_dir / "metrics.jsonl")
    app = DuetApp(watch=run_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: dashboard(app).state.phase == "finished")
        dialog = ExportDialog(run_dir)
        await app.push_screen(dialog)
        assert dialog.query_one("#out", Input).value == str(run_dir / "export-peft")
        dialog.dismiss(None)
        (run_dir / "export-peft").mkdir()
        (run_dir / "export-peft" / "adapter_config.json").write_text("{}")  # an earlier export: not proposed again
        dialog = ExportDialog(run_dir)
        await app.push_screen(dialog)
        assert dialog.query_one("#out", Input).value == str(run_dir / "export-peft-2")


async def test_long_phases_show_their_progress_live_and_when_watched(tmp_path: Path) -> None:
    from tui.session import RunEvent
    from tui.widgets import RunStatus

    def progress(done: int, total: int = 270) -> Event:
        base = {"type": "progress", "phase": "reference", "unit": "pairs", "elapsed": 3.0, "message": "reference"}
        return event_from_json({**base, "done": done, "total": total, "eta": 42.0})

    def status(app) -> str:
        return str(app.screen.query_one(RunStatus).render())

    class Replay(DuetApp):
        def on_mount(self, event) -> None:
            event.prevent_default()
            self.push_screen(DashboardScreen(replay=[]))

    app = Replay()
    async with app.run_test(size=(80, 24)) as pilot:
        board = app.screen
        board.post_message(RunEvent(progress(120)))
        await wait_for(pilot, lambda: "reference 120/270 pairs" in status(app))
        assert "44%" in status(app) and "ETA 0:42" in status(app)
        board.post_message(RunEvent(progress(270)))  # the phase is done: the bar goes
        await wait_for(pilot, lambda: "reference" not in status(app))
        board.post_message(RunEvent(progress(10, 100)))
        await wait_for(pilot, lambda: "10/100" in status(app))
        board.post_message(RunEvent(next(e for e in recorded_events() if e["type"] == "start")))
        await wait_for(pilot, lambda: "10/100" not in status(app) and "TRAINING" in status(app))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps(progress(50).to_json()) + "\n")
    app = DuetApp(watch=run_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: "reference 50/270 pairs" in status(app))


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_the_setup_buttons_fit_the_screen(tmp_path: Path, size) -> None:
    """Every set-up button is whole on screen once scrolled to: none runs past the right edge."""
    from textual.containers import Horizontal
    from textual.widgets import Button

    app = DuetApp(quick_config(tmp_path))
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        row = app.screen.query_one(".buttons", Horizontal)
        row.scroll_visible(animate=False)
        await pilot.pause()
        buttons = list(row.query(Button))
        assert len(buttons) == 5
        for button in buttons:
            assert button.region.width > 0 and button.region.right <= size[0] - 2, (str(button.label), button.region)
