"""The live dashboard: charts over steps, the margin histogram, status and log; controls for a local run,
read-only for a run being watched (`duet watch RUN_DIR`)."""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal
from textual.events import Resize
from textual.screen import Screen
from textual.widgets import Footer, RichLog

from app.api import CheckpointSaved, Config, Event, Finished
from tui.dialogs import ConfirmDialog, ExportDialog, TryItPanel
from tui.follow import MetricsFollower
from tui.session import RunEvent, TrainingFailed, TrainingFinished, TrainingSession
from tui.state import DashboardState
from tui.widgets import MarginHistogram, MetricChart, RunStatus

COMPACT_CHARTS = ("loss", "margins", "accuracy", "rewards")
WIDE_CHARTS = ("loss", "margins", "accuracy", "rewards", "logps", "lr")
WIDE_AT = 140  # columns from which the dashboard shows six charts in three columns
LOG_STYLES = {
    "warning": "yellow",
    "error": "bold red",
    "checkpoint": "green",
    "end": "bold green",
    "stopped": "yellow",
    "paused": "yellow",
}
SILENT_AFTER = 60.0  # seconds without events before watch mode checks whether the run still lives
POLL_EVERY = 0.5  # seconds between reads of a followed metrics.jsonl while it grows
IDLE_POLL_EVERY = 2.0  # ... and once nothing has arrived for IDLE_AFTER seconds
IDLE_AFTER = 10.0
MAX_LOG_LINES = 500
KEEP = "Keep training"


class DashboardScreen(Screen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "pause", "Pause"),
        Binding("s", "stop", "Stop"),
        Binding("c", "checkpoint", "Save now"),
        Binding("e", "export", "Export"),
        Binding("t", "try_it", "Try it"),
        Binding("i", "inspect", "Inspect"),
        Binding("n", "new_run", "New run"),
        Binding("r", "resume", "Resume"),
        Binding("escape", "back", "Back", show=False),
        Binding("q", "quit_app", "Quit", show=False),  # the footer shows ctrl+q, which does the same
    ]

    def __init__(
        self,
        session: TrainingSession | None = None,
        follow: Path | None = None,
        replay: list[Event] | None = None,
    ) -> None:
        super().__init__()
        self.session = session
        self.follower = MetricsFollower(follow) if follow is not None else None
        self.replay = replay
        self.state = DashboardState()
        self._dirty = True
        self._quitting = False
        self._ended = False  # the training thread has returned: the run can be resumed, or a new one set up
        self._last_event = time.monotonic()
        self._next_poll = 0.0
        self.log_lines: list[tuple[str, str]] = []  # (kind, message): every line the log pane shows

    @property
    def logged(self) -> list[str]:
        return [message for _, message in self.log_lines]

    @property
    def source(self) -> str:
        """Where the figures come from, for the status line: the run followed, or the run being trained."""
        if self.follower is not None:
            return f"watching {self.follower.run_dir.name}"
        run_dir = (self.state.run and self.state.run.run_dir) or (self.session and self.session.resume)
        return f"run {Path(run_dir).name}" if run_dir else ""

    # -- layout -----------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield RunStatus(id="status")
        with Grid(id="charts"):
            for chart in WIDE_CHARTS:
                yield MetricChart(chart)
        with Horizontal(id="bottom"):
            yield MarginHistogram(id="histogram")
            yield RichLog(id="log", wrap=True, markup=False, highlight=False, min_width=1)
        yield Footer()

    def on_mount(self) -> None:
        self._layout(self.app.size.width)
        if self.session is not None and self.session.resume is not None:
            self._history(Path(self.session.resume))
        if self.session is not None:
            self.run_worker(
                partial(self.session.run, self.post_message), thread=True, name="training", exit_on_error=False
            )
        if self.follower is not None:
            self._log("info", f"following {self.follower.path}")
            self.poll_metrics()
            self.set_interval(POLL_EVERY, self.poll_metrics)
        for event in self.replay or []:
            self._apply(event)
        self.set_interval(0.25, self.redraw)
        self.redraw()

    def on_resize(self, event: Resize) -> None:
        self._layout(event.size.width)

    def _layout(self, width: int) -> None:
        wide = width >= WIDE_AT
        self.set_class(wide, "wide")
        for chart in self.query(MetricChart):
            chart.display = wide or chart.chart in COMPACT_CHARTS
        self._dirty = True
        self.call_after_refresh(self._rewrap_log)

    def _rewrap_log(self) -> None:
        """Lines are wrapped when written: write them again at the log's new width."""
        log = self.query_one("#log", RichLog)
        log.clear()
        for kind, message in self.log_lines:
            log.write(Text(message, style=LOG_STYLES.get(kind, "")))

    def _history(self, run_dir: Path) -> None:
        """A resumed run's earlier steps, so its charts start at step 1, not at the checkpoint."""
        events, _ = MetricsFollower(run_dir).poll()
        for event in events:
            self._apply(event)
        if events:
            self._log("info", f"earlier steps read from {run_dir / 'metrics.jsonl'}; resuming")

    # -- events -----------------------------------------------------------------------------------------

    def _apply(self, event: Event) -> None:
        phase = self.state.phase
        self.state.apply(event)
        if self.state.phase != phase or isinstance(event, (CheckpointSaved, Finished)):
            self.refresh_bindings()  # what the footer offers depends on where the run is
        self._last_event = time.monotonic()
        kind = event.type
        if event.message and (
            kind in LOG_STYLES or kind in ("start", "reference", "info", "threads", "demo", "samples", "resumed")
        ):
            self._log(kind, event.message)
        self._dirty = True

    def _log(self, kind: str, message: str) -> None:
        if message:
            self.log_lines.append((kind, message))
            del self.log_lines[:-MAX_LOG_LINES]
            self.query_one("#log", RichLog).write(Text(message, style=LOG_STYLES.get(kind, "")))

    @on(RunEvent)
    def run_event(self, message: RunEvent) -> None:
        self._apply(message.event)

    @on(TrainingFinished)
    def finished(self, message: TrainingFinished) -> None:
        self._ended = True
        self.refresh_bindings()
        if message.result.stopped:
            self.notify(f"stopped at step {message.result.state.step}; the checkpoint is saved")
        else:
            self.notify(f"done: the adapter is in {message.result.adapter_dir}", timeout=8)
        if self._quitting:
            self.app.exit()

    @on(TrainingFailed)
    def failed(self, message: TrainingFailed) -> None:
        self._ended = True
        self.state.phase = "failed"
        self.state.progress = None
        self.refresh_bindings()
        self._log("error", f"training failed: {message.message}")
        if message.details:
            self._log("error", message.details)
        if self.state.last_checkpoint:
            self._log("info", f"the last checkpoint is intact: {self.state.last_checkpoint}")
        self.notify(message.message, title="training failed", severity="error", timeout=10)
        self._dirty = True
        if self._quitting:
            self.app.exit()

    def poll_metrics(self) -> None:
        now = time.monotonic()
        if now < self._next_poll:
            return
        events, restarted = self.follower.poll()
        if restarted:  # the run was resumed and cut its metrics back to its checkpoint: start over
            self.state.reset()
            self.log_lines.clear()
            self.query_one("#log", RichLog).clear()
            self._log("info", "metrics.jsonl was cut back (the run was resumed): reading it again")
            self._dirty = True
        for event in events:
            self._apply(event)
        idle = now - self._last_event > IDLE_AFTER
        self._next_poll = now + (IDLE_POLL_EVERY if idle else POLL_EVERY) - 0.05
        if events or self.state.phase in ("finished", "failed", "stopped"):
            return
        phase = self.state.phase
        running = self.follower.is_running()
        if self.state.events == 0 and running is None:
            self.state.phase = "waiting"
        elif running is False and self.state.phase != "not running":
            self.state.phase = "not running"
            self._log(
                "error",
                "no process is running this run any more (killed or crashed before it could "
                "log why); resume it with: python -m core.run --resume " + str(self.follower.run_dir),
            )
        elif running and now - self._last_event > SILENT_AFTER and phase != "training":
            self.state.phase = "training"  # alive, holding its lock: just a long step
        self._dirty |= self.state.phase != phase  # an idle follower redraws nothing

    def redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        self.query_one(RunStatus).show(self.state, self.source)
        for chart in self.query(MetricChart):
            if chart.display:
                chart.draw(self.state)
        self.query_one(MarginHistogram).draw(self.state)

    # -- controls ---------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        live = self.session is not None
        running = live and not self._ended and self.state.phase in ("training", "paused", "waiting")
        if action in ("pause", "stop", "checkpoint"):
            return running
        if action == "try_it":
            return live and self.session.can_generate  # only with a model loaded: never "still loading" forever
        if action == "inspect":
            return live and self.session.config is not None
        if action == "export":
            return self._export_source() is not None
        if action == "new_run":
            return live and self._ended
        if action == "resume":
            return live and self._ended and self._resumable() is not None
        return True

    @property
    def training(self) -> bool:
        """A local run is still under way (quitting must stop it first)."""
        return self.session is not None and not self._ended

    def _run_dir(self) -> Path | None:
        if self.session is None:
            return None
        run_dir = self.session.run_dir or (self.state.run and self.state.run.run_dir) or self.session.resume
        return Path(run_dir) if run_dir else None

    def _resumable(self) -> Path | None:
        """The run directory when the run stopped (or failed) with a checkpoint to resume from."""
        run_dir = self._run_dir()
        if run_dir is None or self.state.adapter or not self.state.last_checkpoint:
            return None
        return run_dir if self.state.phase in ("stopped", "failed") else None

    def action_new_run(self) -> None:
        """Back to the set-up screen with this run's settings, under a name that is still free."""
        from tui.setup import SetupScreen

        config = self.session.config
        run_dir = self._run_dir()
        if config is None and run_dir is not None:  # a resumed run: its own config
            from app.api import RunDirectory

            config = RunDirectory.open(run_dir).load_config()
        if config is None:
            from app.api import resolve_config

            config = resolve_config(None, ())
        config = next_run_config(config)
        self.app.switch_screen(SetupScreen(config, source=f"run {run_dir.name}" if run_dir else "the last run"))

    def action_resume(self) -> None:
        run_dir = self._resumable()
        if run_dir is not None:
            self.app.switch_screen(DashboardScreen(session=TrainingSession(resume=run_dir)))

    def action_back(self) -> None:
        if self.check_action("new_run", ()):
            self.action_new_run()
        elif self.training:
            self.notify("training is running: s stops it (a checkpoint is saved), q quits")

    def action_pause(self) -> None:
        control = self.session.control
        if control.paused:
            control.resume()
            self.notify("resuming")
        else:
            control.pause()
            self.notify("pausing after this step")
        self.refresh_bindings()

    def action_stop(self) -> None:
        def answer(yes: bool | None) -> None:
            if yes:
                self.session.control.request_stop("stopped from the dashboard")
                self.notify("stopping after this step; a checkpoint will be saved")

        self.app.push_screen(
            ConfirmDialog("Stop training? A checkpoint is saved; the run can be resumed later.", yes="Stop", no=KEEP),
            answer,
        )

    def action_checkpoint(self) -> None:
        self.session.control.request_save()
        self.notify("a checkpoint will be saved after this step")

    def _export_source(self) -> Path | None:
        if self.state.adapter:
            return Path(self.state.adapter).parent
        if self.state.last_checkpoint:
            return Path(self.state.last_checkpoint).parent.parent
        return None

    def action_export(self) -> None:
        source = self._export_source()

        def done(out: Path | None) -> None:
            if out is not None:
                self._log("end", f"exported to {out}")
                self.notify(f"exported to {out}")

        self.app.push_screen(ExportDialog(source), done)

    def action_try_it(self) -> None:
        self.app.push_screen(TryItPanel(self.session))

    def action_inspect(self) -> None:
        from tui.inspect_view import InspectScreen

        self.app.push_screen(InspectScreen(self.session.config))

    def action_quit_app(self) -> None:
        if not self.training:
            self.app.exit()
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._quitting = True
                self.session.control.request_stop("quit from the dashboard")
                self.notify("stopping after this step, saving a checkpoint, then quitting")

        self.app.push_screen(
            ConfirmDialog(
                "Training is running. Stop it (a checkpoint is saved) and quit?", yes="Stop and quit", no=KEEP
            ),
            answer,
        )


def next_run_config(config: Config) -> Config:
    """The same settings under a run name no run directory holds yet (a timestamp name is new anyway)."""
    name = config.train.run_name
    root = Path(config.train.output_dir).expanduser()
    if name is None or not (root / name).exists():
        return config
    stem, _, number = name.rpartition("-")
    if not (stem and number.isdigit()):
        stem = name
    suffix = 2
    while (root / f"{stem}-{suffix}").exists():
        suffix += 1
    return replace(config, train=replace(config.train, run_name=f"{stem}-{suffix}"))
