"""SimPO: a reference-free preference loss on average log-probs with a target margin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from core.errors import ConfigError
from core.objectives.base import Objective, PolicyOutputs, smoothed_sigmoid_loss
from core.objectives.ops import Array, ArrayOps

GAMMA_BETA_RATIO = 0.5  # the paper's usual γ/β when neither gamma nor gamma_beta_ratio is set


@dataclass(frozen=True)
class SimPO(Objective):
    """Simple Preference Optimization (Meng et al., 2024, eq. 6), reference-free:
    L = -log σ(β/|y_w| log πθ(y_w) - β/|y_l| log πθ(y_l) - γ), with optional label smoothing.
    Rewards: β log πθ(y) / |y|.
    """

    beta: float = 2.0
    gamma: float = 1.0
    label_smoothing: float = 0.0
    name: ClassVar[str] = "simpo"
    summary: ClassVar[str] = (
        "SimPO: no reference model; compares average log-probs with a target margin γ (typical β 2.0–2.5, "
        "γ/β about 0.5)"
    )
    is_reference_free: ClassVar[bool] = True
    default_beta: ClassVar[float | None] = 2.0
    options: ClassVar[frozenset[str]] = frozenset({"label_smoothing", "gamma"})

    @classmethod
    def resolved_gamma(cls, config: Any) -> float:
        if config.gamma is not None:
            return config.gamma
        ratio = GAMMA_BETA_RATIO if config.gamma_beta_ratio is None else config.gamma_beta_ratio
        return ratio * config.resolved_beta

    @classmethod
    def from_config(cls, config: Any) -> SimPO:
        return cls(config.resolved_beta, cls.resolved_gamma(config), config.label_smoothing)

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.gamma is not None and config.gamma_beta_ratio is not None:
            raise ConfigError("set objective.gamma or objective.gamma_beta_ratio, not both.")

    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        chosen_reward = self.beta * out.chosen_logps / out.chosen_lengths
        rejected_reward = self.beta * out.rejected_logps / out.rejected_lengths
        losses = smoothed_sigmoid_loss(
            ops, chosen_reward - rejected_reward - self.gamma, self.label_smoothing, robust=False
        )
        return losses, ops.stop_gradient(chosen_reward), ops.stop_gradient(rejected_reward)
