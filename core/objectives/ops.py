"""The few array operations the objectives need, which each backend provides for its own arrays.

Arithmetic (``+ - * /``, unary minus) works on NumPy, torch and MLX arrays alike; everything else an
objective uses goes through an ``ArrayOps``, so each objective is written once for every backend.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

Array = Any  # np.ndarray, torch.Tensor or mx.array

MINUS_LN2 = -0.6931471805599453  # where log1mexp switches formula (Mächler, 2012)
LOG1MEXP_FLOOR = 1e-7  # log1mexp's input is capped at −this: log(1 − e^−1e-7) ≈ −16.1, not −∞


class ArrayOps(Protocol):
    def log_sigmoid(self, x: Array) -> Array:
        """log σ(x), computed stably for large |x|."""

    def relu(self, x: Array) -> Array: ...

    def sigmoid(self, x: Array) -> Array:
        """σ(x) = 1 / (1 + e^−x), without overflow for large |x|."""

    def mean(self, x: Array) -> Array:
        """The mean over all elements, as a 0-d array."""

    def stop_gradient(self, x: Array) -> Array:
        """The same values, with no gradient flowing back (metrics and rewards)."""

    def mean_over_ranks(self, x: Array) -> Array:
        """A batch statistic (a 0-d array, no gradient) averaged over the processes of a torchrun job that
        train one global batch together, as TRL gathers it across processes (KTO's z₀); one process: x."""

    def greater(self, a: Array, b: Array) -> Array:
        """1.0 where a > b, else 0.0, in a's floating dtype."""

    def log1mexp(self, x: Array) -> Array:
        """log(1 − eˣ) for a log-probability x ≤ 0, stable near 0 and for very negative x (Mächler, 2012:
        log(−expm1(x)) above −ln 2, log1p(−eˣ) below). x is first capped at −LOG1MEXP_FLOOR: a probability
        of exactly 1 (a float32 average log-prob can round to 0) would give −∞."""


class NumpyOps:
    """ArrayOps for NumPy arrays (no gradients): evaluation and the float64 checks."""

    def log_sigmoid(self, x: np.ndarray) -> np.ndarray:
        return -np.logaddexp(0.0, -x)

    def relu(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0.0)

    def sigmoid(self, x: np.ndarray) -> np.ndarray:
        return np.exp(self.log_sigmoid(x))

    def mean(self, x: np.ndarray) -> np.ndarray:
        return np.mean(x)

    def stop_gradient(self, x: np.ndarray) -> np.ndarray:
        return x

    def mean_over_ranks(self, x: np.ndarray) -> np.ndarray:
        return x

    def greater(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a > b).astype(np.result_type(a, np.float32))

    def log1mexp(self, x: np.ndarray) -> np.ndarray:
        x = np.minimum(x, -LOG1MEXP_FLOOR)
        with np.errstate(divide="ignore", invalid="ignore"):  # np.where evaluates both branches
            return np.where(x > MINUS_LN2, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))
