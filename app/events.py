"""A run's events fanned out to their sinks (metrics.jsonl, the console, a callback)."""

from __future__ import annotations

import time
from typing import Any

from core.events import Callback, Evaluation, Event, TrainStep


class Events:
    """Fans each event out to the sinks and remembers the latest train/eval metrics."""

    def __init__(self, sinks: list[Callback]) -> None:
        self.sinks = sinks
        self.last_train: TrainStep | None = None
        self.last_eval: Evaluation | None = None
        self.history: list[Event] = []

    def __call__(self, event: Event) -> None:
        if event.time is None:
            event.time = time.time()
        self.remember([event])
        self.history.append(event)
        for sink in self.sinks:
            sink(event)

    def remember(self, events: list[Event]) -> None:
        """Keep the latest train and eval metrics (also those logged before a resume)."""
        for event in events:
            if isinstance(event, TrainStep):
                self.last_train = event
            elif isinstance(event, Evaluation):
                self.last_eval = event

    def final_metrics(self) -> dict[str, Any]:
        """The last step's and the last evaluation's numbers, under their metrics.jsonl names."""
        numbers = lambda e: {  # noqa: E731
            k: v for k, v in (e.to_json() if e else {}).items() if isinstance(v, (int, float)) and k != "time"
        }
        return {**numbers(self.last_train), **numbers(self.last_eval)}
