"""Hinge (SLiC): a margin loss on the DPO logit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from core.objectives.base import Objective, PolicyOutputs
from core.objectives.ops import Array, ArrayOps


@dataclass(frozen=True)
class Hinge(Objective):
    """Hinge loss on the DPO logit: SLiC-HF's calibration loss (Zhao et al., 2023) in the reference-anchored
    form of RSO (Liu et al., 2024) and TRL's "hinge":
    L = max(0, 1 - β [(log πθ(y_w) - log πref(y_w)) - (log πθ(y_l) - log πref(y_l))]).
    Rewards: β (log πθ(y) - log πref(y)).
    """

    beta: float = 0.1
    name: ClassVar[str] = "hinge"
    summary: ClassVar[str] = "hinge (SLiC): max(0, 1 − β·margin); needs the reference model"

    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        ref_chosen, ref_rejected = self._reference(out)
        chosen_ratio = out.chosen_logps - ref_chosen
        rejected_ratio = out.rejected_logps - ref_rejected
        losses = ops.relu(1.0 - self.beta * (chosen_ratio - rejected_ratio))
        return (losses, ops.stop_gradient(self.beta * chosen_ratio), ops.stop_gradient(self.beta * rejected_ratio))
