"""The live dashboard: charts over steps, the margin histogram, status and log; controls for a local run,
read-only for a run being watched (`duet watch RUN_DIR`)."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal
from textual.events import Resize
from textual.screen import Screen
from textual.widgets import Footer, RichLog

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


class DashboardScreen(Screen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "pause", "Pause/resume"),
        Binding("s", "stop", "Stop"),
        Binding("c", "checkpoint", "Save now"),
        Binding("e", "export", "Export"),
        Binding("t", "try_it", "Try it"),
        Binding("i", "inspect", "Inspect data"),
        Binding("q", "quit_app", "Quit"),
    ]

    def __init__(
        self,
        session: TrainingSession | None = None,
        follow: Path | None = None,
        replay: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.session = session
        self.follower = MetricsFollower(follow) if follow is not None else None
        self.replay = replay
        self.state = DashboardState()
        self._dirty = True
        self._quitting = False
        self._last_event = time.monotonic()
        self.logged: list[str] = []  # every line the log pane shows, as plain text
        self.source = "live" if session else f"watching {follow.name}" if follow else "replay"

    # -- layout -----------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield RunStatus(id="status")
        with Grid(id="charts"):
            for chart in WIDE_CHARTS:
                yield MetricChart(chart)
        with Horizontal(id="bottom"):
            yield MarginHistogram(id="histogram")
            yield RichLog(id="log", wrap=True, markup=False, highlight=False)
        yield Footer()

    def on_mount(self) -> None:
        self._layout(self.app.size.width)
        if self.session is not None:
            self.run_worker(
                partial(self.session.run, self.post_message), thread=True, name="training", exit_on_error=False
            )
        if self.follower is not None:
            self._log("info", f"following {self.follower.path}")
            self.poll_metrics()
            self.set_interval(0.5, self.poll_metrics)
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

    # -- events -----------------------------------------------------------------------------------------

    def _apply(self, event: dict[str, Any]) -> None:
        phase = self.state.phase
        self.state.apply(event)
        if self.state.phase != phase or event.get("type") in ("checkpoint", "end"):
            self.refresh_bindings()  # what the footer offers depends on where the run is
        self._last_event = time.monotonic()
        kind = event.get("type")
        if event.get("message") and (kind in LOG_STYLES or kind in ("start", "reference", "info", "resumed")):
            self._log(kind, event["message"])
        self._dirty = True

    def _log(self, kind: str, message: str) -> None:
        if message:
            self.logged.append(message)
            self.query_one("#log", RichLog).write(Text(message, style=LOG_STYLES.get(kind, "")))

    @on(RunEvent)
    def run_event(self, message: RunEvent) -> None:
        self._apply(message.event)

    @on(TrainingFinished)
    def finished(self, message: TrainingFinished) -> None:
        if message.result.stopped:
            self.notify(f"stopped at step {message.result.state.step}; the checkpoint is saved")
        else:
            self.notify(f"done: the adapter is in {message.result.adapter_dir}", timeout=8)
        if self._quitting:
            self.app.exit()

    @on(TrainingFailed)
    def failed(self, message: TrainingFailed) -> None:
        self.state.phase = "failed"
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
        events, restarted = self.follower.poll()
        if restarted:
            self.state.reset()
            self._log("info", "metrics.jsonl was cut back (the run was resumed): reading it again")
        for event in events:
            self._apply(event)
        if not events and self.state.phase not in ("finished", "failed", "stopped"):
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
            elif running and time.monotonic() - self._last_event > SILENT_AFTER:
                self.state.phase = "training"  # alive, holding its lock: just a long step
            self._dirty = True

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
        running = live and self.state.phase in ("training", "paused", "waiting")
        if action in ("pause", "stop", "checkpoint"):
            return running
        if action == "try_it":
            return live
        if action == "inspect":
            return live and self.session.config is not None
        if action == "export":
            return self._export_source() is not None
        return True

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
            ConfirmDialog("Stop training? A checkpoint is saved, and the run can be resumed later.", yes="Stop"), answer
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
        if self.session is None or self.state.phase not in ("training", "paused", "waiting"):
            self.app.exit()
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._quitting = True
                self.session.control.request_stop("quit from the dashboard")
                self.notify("stopping after this step, saving a checkpoint, then quitting")

        self.app.push_screen(
            ConfirmDialog("Training is running. Stop it (a checkpoint is saved) and quit?", yes="Stop and quit"), answer
        )
