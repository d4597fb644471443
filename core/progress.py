"""Progress of a long phase (the reference pass, evaluation, generation, export) as events.

A phase reports how much of it is done; `PhaseProgress` turns that into ``progress`` events with a count,
the elapsed time and an ETA: at most one a second, the last always once any was sent, none for a phase
shorter than that. The console, the TUI and ``metrics.jsonl`` (hence ``duet watch``) show the same bar
without flooding any of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from core.events import Event, Progress
from core.metrics import format_duration

EVERY_SECONDS = 1.0  # the most often a phase reports


class PhaseProgress:
    """Call it with (done, total) as the phase goes on; it emits throttled ``progress`` events."""

    def __init__(
        self,
        emit: Callable[[Event], None],
        phase: str,
        label: str,
        total: int,
        *,
        unit: str = "pairs",
        every_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit, self.phase, self.label, self.total, self.unit = emit, phase, label, total, unit
        self.every_seconds = EVERY_SECONDS if every_seconds is None else every_seconds
        self.clock = clock
        self.started = clock()
        self._last: float | None = None
        self.done = 0

    def __call__(self, done: int, total: int | None = None) -> None:
        self.done, self.total = done, self.total if total is None else total
        now = self.clock()
        finished = done >= self.total
        # a phase quicker than `every_seconds` says nothing: its bar would only flash (and fill metrics.jsonl)
        since = now - (self.started if self._last is None else self._last)
        if since < self.every_seconds and (not finished or self._last is None):
            return
        self._last = now
        elapsed = now - self.started
        eta = 0.0 if finished else (elapsed / done * (self.total - done) if done else None)
        self.emit(
            Progress(
                phase=self.phase,
                label=self.label,
                done=done,
                total=self.total,
                unit=self.unit,
                elapsed=round(elapsed, 3),
                eta=None if eta is None else round(eta, 3),
                message=f"{self.label}: {done}/{self.total} {self.unit}, {format_duration(elapsed)} elapsed"
                + ("" if finished else f", ETA {format_duration(eta)}"),
            )
        )
