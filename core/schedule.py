"""Learning-rate schedules, computed in the core so every backend follows the same one."""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return math.ceil(warmup_ratio * total_steps)


def learning_rate(step: int, *, total_steps: int, peak: float, warmup: int, kind: str) -> float:
    """The rate for optimizer step ``step`` (0-based): linear warm-up reaching ``peak`` at the last warm-up
    step, then cosine or linear decay towards zero (never exactly zero on the last step), or constant."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return peak * (1.0 - progress)
    if kind == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")
