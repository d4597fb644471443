"""Length-normalized DPO: DPO on per-token log-ratios."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from core.objectives.base import PolicyOutputs
from core.objectives.dpo import DPO
from core.objectives.ops import Array


@dataclass(frozen=True)
class LengthNormalizedDPO(DPO):
    """DPO on per-token log-ratios (as in Tülu 3's length-normalized DPO):
    L = -log σ(β [(log πθ(y_w) - log πref(y_w)) / |y_w| - (log πθ(y_l) - log πref(y_l)) / |y_l|]),
    which removes DPO's pull towards longer replies. Rewards: β (log πθ(y) - log πref(y)) / |y|.
    """

    name: ClassVar[str] = "dpo_norm"
    summary: ClassVar[str] = (
        "length-normalized DPO: DPO on per-token log-ratios, so longer replies earn no advantage; needs the "
        "reference model"
    )

    def _log_ratios(self, out: PolicyOutputs) -> tuple[Array, Array]:
        chosen_ratio, rejected_ratio = super()._log_ratios(out)
        return chosen_ratio / out.chosen_lengths, rejected_ratio / out.rejected_lengths
