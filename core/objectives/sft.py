"""SFT: the likelihood of the chosen replies, no preference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from core.objectives.base import Objective, PolicyOutputs
from core.objectives.ops import Array, ArrayOps


@dataclass(frozen=True)
class SFT(Objective):
    """Supervised fine-tuning on the chosen replies: L = -log πθ(y_w) / |y_w| (per-token NLL).

    The DPO paper takes π_ref as the maximum-likelihood model on the chosen replies when no SFT model
    exists; this objective builds one. Its "rewards" are per-token log-probs, so rewards/accuracies tells
    how often the chosen reply is already the likelier one.
    """

    name: ClassVar[str] = "sft"
    summary: ClassVar[str] = "SFT: plain likelihood of the chosen replies, no preference; reference-free"
    is_reference_free: ClassVar[bool] = True
    default_beta: ClassVar[float | None] = None

    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        chosen_mean = out.chosen_logps / out.chosen_lengths
        return (
            -chosen_mean,
            ops.stop_gradient(chosen_mean),
            ops.stop_gradient(out.rejected_logps / out.rejected_lengths),
        )
