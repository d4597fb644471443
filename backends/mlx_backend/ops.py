"""ArrayOps for MLX arrays: the objectives in ``core.objectives`` run on these, with mx.grad."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from core.objectives.ops import LOG1MEXP_FLOOR, MINUS_LN2


class MlxOps:
    def log_sigmoid(self, x: mx.array) -> mx.array:
        return nn.log_sigmoid(x)

    def relu(self, x: mx.array) -> mx.array:
        return mx.maximum(x, 0.0)

    def sigmoid(self, x: mx.array) -> mx.array:
        return mx.sigmoid(x)

    def mean(self, x: mx.array) -> mx.array:
        return mx.mean(x)

    def stop_gradient(self, x: mx.array) -> mx.array:
        return mx.stop_gradient(x)

    def mean_over_ranks(self, x: mx.array) -> mx.array:
        return x  # MLX trains in one process

    def greater(self, a: mx.array, b: mx.array) -> mx.array:
        return (a > b).astype(a.dtype)

    def log1mexp(self, x: mx.array) -> mx.array:
        x = mx.minimum(x, -LOG1MEXP_FLOOR)
        return mx.where(x > MINUS_LN2, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))
