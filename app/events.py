"""A run's events fanned out to their sinks (metrics.jsonl, the console, a callback)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from core.metrics import Event


class Events:
    """Fans each event out to the sinks and remembers the latest train/eval metrics."""

    def __init__(self, sinks: list[Callable[[Event], None]]) -> None:
        self.sinks = sinks
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.history: list[Event] = []

    def __call__(self, event: Event) -> None:
        event.setdefault("time", time.time())
        if event["type"] == "train":
            self.last_train = event
        elif event["type"] == "eval":
            self.last_eval = event
        self.history.append(event)
        for sink in self.sinks:
            sink(event)

    def remember(self, events: list[Event]) -> None:
        """Take the latest train and eval metrics from events logged before a resume."""
        for event in events:
            if event.get("type") == "train":
                self.last_train = event
            elif event.get("type") == "eval":
                self.last_eval = event

    def final_metrics(self) -> dict[str, Any]:
        keep = lambda e: {k: v for k, v in e.items() if isinstance(v, (int, float)) and k not in ("time", "type")}  # noqa: E731
        return {**keep(self.last_train), **keep(self.last_eval)}
