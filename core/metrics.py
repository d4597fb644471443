"""Where a run's events (`core.events`) go: ``metrics.jsonl`` (one flat JSON object per line, TRL's metric
names) and the console; and the one reader of that file, for a resume, ``duet watch`` and the TUI.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from core import faults
from core.events import (
    CheckpointSaved,
    DemoReport,
    Evaluation,
    Event,
    Failed,
    Finished,
    Info,
    Progress,
    ReferenceReady,
    RoundReport,
    RunStarted,
    RunWarning,
    SampleReplies,
    Stopped,
    ThreadsChanged,
    TrainStep,
    event_from_json,
)


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than produce an unreadable line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Appends one event per line to ``metrics.jsonl``, each in a single write, flushed and fsynced."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "ab")  # noqa: SIM115 - held open for the whole run, closed by close()

    def __call__(self, event: Event) -> None:
        line = json.dumps(_clean(event.to_json()), separators=(",", ":"), allow_nan=False).encode() + b"\n"
        if faults.armed("metrics.line"):  # killed half-way through a line: readers must skip the torn end
            self._handle.write(line[: len(line) // 2])
            self._handle.flush()
            faults.reach_now()
        self._handle.write(line)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def offset(self) -> int:
        return self._handle.tell()

    def close(self) -> None:
        self._handle.close()


def parse_lines(data: bytes) -> list[Event]:
    """The events in complete ``metrics.jsonl`` lines; a torn line (a writer killed mid-line) is skipped, and
    so is a kind this version does not know."""
    events = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line: killed while writing it
        event = event_from_json(record) if isinstance(record, dict) else None
        if event is not None:
            events.append(event)
    return events


def read_metrics(path: str | Path) -> list[Event]:
    """The events in a metrics file; a torn last line (a run killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    return parse_lines(path.read_bytes())


def truncate_metrics(path: str | Path, offset: int) -> None:
    """Cut the file back to ``offset`` bytes: resuming drops events logged after the checkpoint."""
    path = Path(path)
    if path.exists() and path.stat().st_size > offset:
        with open(path, "r+b") as handle:
            handle.truncate(offset)
            handle.flush()
            os.fsync(handle.fileno())


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _value(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


class ConsoleReporter:
    """A live progress bar in a terminal (loss, margin, accuracy, tokens/s, ETA); plain lines in a log."""

    def __init__(self, console: Console | None = None, every_seconds: float = 10.0) -> None:
        self.console = console or Console()
        self.every_seconds = every_seconds
        self._progress: RichProgress | None = None
        self._task: Any = None
        self._phase_bar: RichProgress | None = None  # a long phase's bar before training starts
        self._phase_task: Any = None
        self._last_line = 0.0

    def __call__(self, event: Event) -> None:
        if not isinstance(event, Progress):  # anything else ends a phase's bar first (it is transient)
            self._stop_phase()
        if isinstance(event, (Stopped, Failed, Finished)):  # the run is over: its progress line goes above
            self._stop_progress()
        match event:
            case RunStarted():
                self._print(event.message)
                self._start(event)
            case TrainStep():
                self._train(event)
            case Evaluation():
                metrics = "  ".join(
                    f"{k} {event.metrics[k]:.4f}"
                    for k in ("loss", "rewards/margins", "rewards/accuracies")
                    if event.metrics.get(k) is not None
                )
                self._print(Text.assemble(("eval", "bold"), f" step {event.step}: {metrics}"))
            case RunWarning():
                self._print(Text.assemble(("warning: ", "yellow"), event.message))
            case Failed():
                self._print(Text.assemble(("error: ", "bold red"), event.message))
            case Finished():
                self._print(Text(event.message, style="bold green"))
            case Progress():
                self._phase(event)
            case (
                ReferenceReady()
                | CheckpointSaved()
                | Stopped()
                | Info()
                | ThreadsChanged()
                | DemoReport()
                | SampleReplies()
                | RoundReport()
            ):
                self._print(Text(event.message))

    def _print(self, text: Text | str) -> None:
        # Text, never markup: messages carry paths and names with brackets that rich would read as tags
        text = text if isinstance(text, Text) else Text(text)
        (self._progress.console if self._progress else self.console).print(text, highlight=False)

    def _start(self, event: RunStarted) -> None:
        if not self.console.is_terminal:
            return
        self._progress = RichProgress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=event.total_steps, completed=event.start_step, status="", eta="?"
        )

    def _train(self, event: TrainStep) -> None:
        metrics = event.metrics
        status = (
            f"loss {_value(metrics.get('loss'), '.4f')}  margin {_value(metrics.get('rewards/margins'))}  "
            f"acc {_value(metrics.get('rewards/accuracies'), '.2f')}  {_value(event.tokens_per_second, '.0f')} tok/s"
        )
        if self._progress is not None:
            self._progress.update(self._task, completed=event.step, status=status, eta=format_duration(event.eta))
            return
        now = time.monotonic()
        # the last step always (eta 0: a run's last, or a round's when rounds share one step axis)
        if now - self._last_line >= self.every_seconds or event.step == event.total_steps or event.eta == 0:
            self._last_line = now
            self._print(f"step {event.step}/{event.total_steps}  {status}  ETA {format_duration(event.eta)}")

    def _phase(self, event: Progress) -> None:
        """A long phase's bar: its own transient bar before training, the training bar's status during it,
        a line every ``every_seconds`` in a log (the phase's own closing message follows it)."""
        finished = event.finished
        if self._progress is not None and self._task is not None:  # evaluation during training
            self._progress.update(self._task, status="" if finished else event.message)
            return
        if not self.console.is_terminal:
            now = time.monotonic()
            if not finished and now - self._last_line >= self.every_seconds:
                self._last_line = now
                self._print(event.message)
            return
        if self._phase_bar is None:
            self._phase_bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} {task.fields[unit]}"),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"),
                console=self.console,
                transient=True,
            )
            self._phase_bar.start()
            self._phase_task = self._phase_bar.add_task(event.label, total=event.total, unit=event.unit, eta="?")
        self._phase_bar.update(
            self._phase_task,
            description=event.label,
            completed=event.done,
            total=event.total,
            eta=format_duration(event.eta),
        )
        if finished:
            self._stop_phase()

    def _stop_phase(self) -> None:
        if self._phase_bar is not None:
            self._phase_bar.stop()
            self._phase_bar = None

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self._stop_phase()
        self._stop_progress()
