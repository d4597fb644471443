"""KTO: a loss for unpaired feedback, each reply rated desirable or undesirable on its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from core.errors import ConfigError
from core.objectives.base import Objective, PolicyOutputs
from core.objectives.ops import Array, ArrayOps


@dataclass(frozen=True)
class KTO(Objective):
    """Kahneman-Tversky Optimization (Ethayarajh et al., 2024, eq. 8). Each example is one reply y to x with a
    label; r(x, y) = log πθ(y|x) − log πref(y|x), and the reference point z₀ estimates KL(πθ ‖ πref):
        desirable:   L = λ_D · (1 − σ(β (r − z₀)))
        undesirable: L = λ_U · (1 − σ(β (z₀ − r)))
    that is λ_y − v(x, y), the paper's value v minus its constant. z₀ is the mean log-ratio of the batch's
    mismatched rows (each prompt with another example's reply, ``rejected`` in the batch layout), clamped at
    0 and detached: TRL's KTOTrainer's convention (the paper: "we do not backpropagate through z₀"). The
    mismatched reply of an example is chosen once when the data is loaded (``core.data.unpaired``); TRL
    rotates each batch's completions by one instead. Under torchrun z₀ is the mean of every rank's estimate
    on its share of the global batch, as TRL gathers it (in training; evaluation keeps each rank's own).

    Metrics follow TRL: ``kl`` is z₀, ``rewards/chosen`` and ``logps/chosen`` are means over the batch's
    desirable examples, ``rewards/rejected`` and ``logps/rejected`` over its undesirable ones (0 when the batch
    has none), ``rewards/margins`` their difference. Duet adds ``rewards/accuracies``: the share of examples on
    their label's side of the reference point (r > z₀ for a desirable one, r < z₀ for an undesirable one).
    Per example, the "chosen reward" returned is that signed distance, ±β (r − z₀), and the "rejected
    reward" 0, so the per-example margins the dashboard draws are positive where an example sits right.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    name: ClassVar[str] = "kto"
    summary: ClassVar[str] = (
        "KTO: unpaired replies rated desirable or not (thumbs up/down), each pushed past a KL reference point "
        "(data.unpaired=true splits pairs into such examples)"
    )
    unpaired: ClassVar[bool] = True
    per_example_loss: ClassVar[bool] = False  # z0 is the batch's
    default_beta: ClassVar[float | None] = 0.1
    options: ClassVar[frozenset[str]] = frozenset({"desirable_weight", "undesirable_weight"})

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.nll_weight:
            raise ConfigError(
                "objective.nll_weight: KTO takes no NLL term (its rated replies include undesirable ones); set "
                "objective.nll_weight=0 (the demo's run.yaml sets 1.0 for DPO)."
            )

    @classmethod
    def from_config(cls, config: Any) -> Objective:
        return cls(config.resolved_beta, config.desirable_weight or 1.0, config.undesirable_weight or 1.0)

    def parts(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        """(r, z₀, labels as 1.0/0.0)."""
        if out.labels is None:
            raise ValueError("KTO needs each example's label (desirable or undesirable)")
        reference_chosen, reference_rejected = self._reference(out)
        ratio = out.chosen_logps - reference_chosen
        # under torchrun, the mean over every process's share of the global batch (TRL gathers it too)
        z0 = ops.relu(ops.mean_over_ranks(ops.stop_gradient(ops.mean(out.rejected_logps - reference_rejected))))
        return ratio, z0, out.labels

    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        ratio, z0, desirable = self.parts(ops, out)
        undesirable = 1.0 - desirable
        above = self.beta * (ratio - z0)
        losses = desirable * self.desirable_weight * ops.sigmoid(-above) + (
            undesirable * self.undesirable_weight * ops.sigmoid(above)
        )
        signed = ops.stop_gradient((desirable - undesirable) * above)
        return losses, signed, 0.0 * signed

    def metrics(self, ops: ArrayOps, out: PolicyOutputs) -> dict[str, Array]:
        ratio, z0, desirable = self.parts(ops, out)
        undesirable = 1.0 - desirable
        rewards = ops.stop_gradient(self.beta * ratio)
        logps = ops.stop_gradient(out.chosen_logps)
        chosen, rejected = _mean_where(ops, rewards, desirable), _mean_where(ops, rewards, undesirable)
        right = desirable * ops.greater(ratio, z0) + undesirable * ops.greater(z0, ratio)
        return {
            "kl": z0,
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracies": ops.stop_gradient(ops.mean(right)),
            "logps/chosen": _mean_where(ops, logps, desirable),
            "logps/rejected": _mean_where(ops, logps, undesirable),
        }


def _mean_where(ops: ArrayOps, values: Array, mask: Array) -> Array:
    """The mean of ``values`` where ``mask`` is 1 (0 where it is 0 everywhere), with array ops only: the
    MLX step is compiled, so no count may leave the graph."""
    share = ops.mean(mask)
    floor = 0.5 / mask.shape[0]  # below one example's share: stands in for an empty class
    return ops.mean(values * mask) / (ops.relu(share - floor) + floor)
