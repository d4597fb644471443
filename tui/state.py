"""What the dashboard shows, built from metric events alone (a live run's callback or a metrics.jsonl
being followed): series over steps, the latest per-pair margins, the run's status, and a log."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.api import (
    CheckpointSaved,
    Evaluation,
    Event,
    Failed,
    Finished,
    Paused,
    Progress,
    Resumed,
    RoundReport,
    RunStarted,
    Stopped,
    TrainStep,
)

TRAIN_SERIES = (
    "loss",
    "rewards/margins",
    "rewards/accuracies",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "learning_rate",
    "grad_norm",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
    "kl",
)
LOG_KINDS = (
    "start",
    "reference",
    "checkpoint",
    "warning",
    "error",
    "stopped",
    "end",
    "info",
    "threads",
    "demo",
    "samples",
    "paused",
    "resumed",
    "round",
)
MAX_LOG = 500


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: Any) -> None:
        if isinstance(value, (int, float)):
            self.steps.append(step)
            self.values.append(float(value))

    def __bool__(self) -> bool:
        return bool(self.steps)

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None


@dataclass
class DashboardState:
    phase: str = "waiting"  # waiting, training, paused, stopped, finished, failed, not running
    train: dict[str, Series] = field(default_factory=lambda: {k: Series() for k in TRAIN_SERIES})
    eval: dict[str, Series] = field(default_factory=lambda: {k: Series() for k in TRAIN_SERIES})
    margins: list[float] = field(default_factory=list)  # the latest batch's per-pair margins
    eval_margins: list[float] = field(default_factory=list)
    run: RunStarted | None = None  # model, backend, objective, totals
    latest: TrainStep | None = None
    log: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)
    adapter: str | None = None
    last_checkpoint: str | None = None
    progress: Progress | None = None  # the latest progress event of a phase still under way (loading, reference, ...)
    round: RoundReport | None = None  # iterative rounds: the latest round report (round, phase)
    round_results: dict[int, RoundReport] = field(default_factory=dict)  # each finished round's figures
    round_starts: set[int] = field(default_factory=set)  # steps where a later round's training began
    events: int = 0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def apply(self, event: Event) -> None:
        self.events += 1
        if isinstance(event, Progress):
            self.progress = None if event.finished else event
        elif isinstance(event, (RunStarted, TrainStep, Finished, Stopped, Failed)):
            self.progress = None  # the phase is over: training has started, or the run has ended
        match event:
            case RunStarted():
                self.run = event
                self.phase = "training"
                if event.resumed:  # a resumed run re-sends what followed its checkpoint
                    self._drop_after(event.start_step)
            case TrainStep():
                self._drop_after(event.step - 1)
                row = event.to_json()  # the metrics and the learning rate and gradient norm, by name
                for key in TRAIN_SERIES:
                    self.train[key].add(event.step, row.get(key))
                self.margins = list(event.margins)
                self.latest = event
                if self.phase in ("waiting", "stopped", "not running"):
                    self.phase = "training"
            case Evaluation():
                for key in TRAIN_SERIES:
                    self.eval[key].add(event.step, event.metrics.get(key))
                self.eval_margins = list(event.margins)
            case CheckpointSaved():
                self.last_checkpoint = event.path
            case Paused():
                self.phase = "paused"
            case Resumed():
                self.phase = "training"
            case Stopped():
                self.phase = "stopped"
            case Finished():
                self.phase = "finished"
                self.adapter = event.adapter
            case Failed():
                self.phase = "failed"
            case RoundReport():
                self.round = event
                if event.round > 1:
                    self.round_starts.add(event.step_offset)
                if event.phase == "done":
                    self.round_results[event.round] = event
                if self.phase in ("waiting", "stopped", "not running"):
                    self.phase = "training"
        if event.type in LOG_KINDS and event.message:
            self.log.append((event.type, event.message))
            del self.log[:-MAX_LOG]

    def _drop_after(self, step: int) -> None:
        """Points after ``step`` belong to a run that was interrupted and resumed from an earlier checkpoint."""
        for table in (self.train, self.eval):
            for series in table.values():
                while series.steps and series.steps[-1] > step:
                    series.steps.pop()
                    series.values.pop()

    @property
    def step(self) -> int:
        if self.latest is not None:
            return self.latest.step
        return self.run.start_step if self.run is not None else 0

    @property
    def total_steps(self) -> int | None:
        if self.latest is not None:
            return self.latest.total_steps
        return self.run.total_steps if self.run is not None else None
