"""IPO: a squared preference loss that does not saturate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from core.objectives.base import Objective, PolicyOutputs
from core.objectives.ops import Array, ArrayOps


@dataclass(frozen=True)
class IPO(Objective):
    """Identity Preference Optimization (Azar et al., 2023, eq. 17): L = (h - 1/(2β))², where h is the
    difference of log-ratios. As in TRL, and as the paper's authors advised its maintainers, h uses
    per-token (length-averaged) log-ratios, so 1/(2β) keeps one scale whatever the reply lengths.
    Rewards: β (log πθ(y) - log πref(y)) / |y|.
    """

    beta: float = 0.1
    name: ClassVar[str] = "ipo"
    summary: ClassVar[str] = (
        "IPO: a squared loss that does not saturate, robust to over-fitting deterministic preferences; needs the "
        "reference model; β is the paper's τ"
    )

    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        ref_chosen, ref_rejected = self._reference(out)
        chosen_ratio = (out.chosen_logps - ref_chosen) / out.chosen_lengths
        rejected_ratio = (out.rejected_logps - ref_rejected) / out.rejected_lengths
        gap = chosen_ratio - rejected_ratio - 1.0 / (2.0 * self.beta)
        return (gap * gap, ops.stop_gradient(self.beta * chosen_ratio), ops.stop_gradient(self.beta * rejected_ratio))
