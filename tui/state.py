"""What the dashboard shows, built from metric events alone (a live run's callback or a metrics.jsonl
being followed): series over steps, the latest per-pair margins, the run's status, and a log."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Event = dict[str, Any]

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
)
LOG_KINDS = ("start", "reference", "checkpoint", "warning", "error", "stopped", "end", "info", "paused", "resumed")
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
    run: dict[str, Any] = field(default_factory=dict)  # the start event: model, backend, objective, totals
    latest: Event = field(default_factory=dict)  # the latest train event
    log: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)
    adapter: str | None = None
    last_checkpoint: str | None = None
    progress: Event | None = None  # the latest progress event of a phase still under way (loading, reference, ...)
    events: int = 0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def apply(self, event: Event) -> None:
        kind = event.get("type")
        self.events += 1
        if kind == "progress":
            done, total = event.get("done"), event.get("total")
            unfinished = isinstance(done, (int, float)) and isinstance(total, (int, float)) and done < total
            self.progress = event if unfinished else None
        elif kind in ("start", "train", "end", "stopped", "error"):
            self.progress = None  # the phase is over: training has started, or the run has ended
        if kind == "start":
            self.run = event
            self.phase = "training"
            if event.get("resumed"):  # a resumed run re-sends what followed its checkpoint
                self._drop_after(event.get("start_step", 0))
        elif kind == "train":
            step = int(event["step"])
            self._drop_after(step - 1)
            for key in TRAIN_SERIES:
                self.train[key].add(step, event.get(key))
            self.margins = list(event.get("margins") or [])
            self.latest = event
            if self.phase in ("waiting", "stopped", "not running"):
                self.phase = "training"
        elif kind == "eval":
            step = int(event["step"])
            for key in TRAIN_SERIES:
                self.eval[key].add(step, event.get(f"eval_{key}"))
            self.eval_margins = list(event.get("eval_margins") or [])
        elif kind == "checkpoint":
            self.last_checkpoint = event.get("path")
        elif kind == "paused":
            self.phase = "paused"
        elif kind == "resumed":
            self.phase = "training"
        elif kind == "stopped":
            self.phase = "stopped"
        elif kind == "end":
            self.phase = "finished"
            self.adapter = event.get("adapter")
        elif kind == "error":
            self.phase = "failed"
        if kind in LOG_KINDS and event.get("message"):
            self.log.append((kind, str(event["message"])))
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
        return int(self.latest.get("step", self.run.get("start_step", 0)))

    @property
    def total_steps(self) -> int | None:
        return self.latest.get("total_steps") or self.run.get("total_steps")
