"""DPO: the preference loss relative to a reference model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from core.errors import ConfigError
from core.objectives.base import Objective, PolicyOutputs, smoothed_sigmoid_loss
from core.objectives.ops import Array, ArrayOps


@dataclass(frozen=True)
class DPO(Objective):
    """Direct Preference Optimization (Rafailov et al., 2023, eq. 7):
    L = -log σ(β [(log πθ(y_w) - log πref(y_w)) - (log πθ(y_l) - log πref(y_l))]),
    with optional cDPO / robust label smoothing. Rewards: β (log πθ(y) - log πref(y)).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    robust: bool = False
    name: ClassVar[str] = "dpo"
    summary: ClassVar[str] = (
        "DPO: prefers chosen over rejected relative to a reference model (the base model, adapter off), "
        "computed once before training and cached"
    )
    options: ClassVar[frozenset[str]] = frozenset({"label_smoothing", "robust"})

    @classmethod
    def from_config(cls, config: Any) -> DPO:
        return cls(config.resolved_beta, config.label_smoothing, config.robust)

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.robust and not config.label_smoothing:
            raise ConfigError(
                "objective.robust needs objective.label_smoothing > 0 (the assumed rate of flipped "
                "labels); with 0 it is plain DPO."
            )

    def _log_ratios(self, out: PolicyOutputs) -> tuple[Array, Array]:
        ref_chosen, ref_rejected = self._reference(out)
        return out.chosen_logps - ref_chosen, out.rejected_logps - ref_rejected

    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        chosen_ratio, rejected_ratio = self._log_ratios(out)
        losses = smoothed_sigmoid_loss(
            ops, self.beta * (chosen_ratio - rejected_ratio), self.label_smoothing, self.robust
        )
        return (losses, ops.stop_gradient(self.beta * chosen_ratio), ops.stop_gradient(self.beta * rejected_ratio))
