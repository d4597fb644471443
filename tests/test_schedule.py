"""Learning-rate schedules: warm-up, then cosine, linear or constant; the same for every backend."""

from __future__ import annotations

import itertools
import math

import pytest

from core.schedule import learning_rate, warmup_steps


def rates(kind: str, total: int = 10, warmup: int = 2) -> list[float]:
    return [learning_rate(s, total_steps=total, peak=1.0, warmup=warmup, kind=kind) for s in range(total)]


def test_warmup_reaches_the_peak_on_its_last_step_and_never_starts_at_zero() -> None:
    assert rates("constant")[:3] == [0.5, 1.0, 1.0]


def test_cosine_and_linear_decay_towards_zero_without_reaching_it() -> None:
    cosine, linear = rates("cosine"), rates("linear")
    assert cosine[2] == 1.0 and linear[2] == 1.0
    assert all(a > b for a, b in itertools.pairwise(cosine[2:]))
    assert cosine[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8))) and cosine[-1] > 0
    assert linear[-1] == pytest.approx(1 / 8)


def test_warmup_steps_from_ratio_or_count() -> None:
    assert warmup_steps(100, None, 0.1) == 10
    assert warmup_steps(100, 5, 0.1) == 5
    assert warmup_steps(3, 10, 0.0) == 3
    assert rates("cosine", total=4, warmup=0)[0] == 1.0
