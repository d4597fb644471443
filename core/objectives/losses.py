"""Preference objectives, each written once against ``ArrayOps`` so every backend shares the maths.

Inputs are per-sequence *summed* response log-probs (policy, and reference where needed) and response
lengths in tokens. Each objective returns per-pair ``(losses, chosen_rewards, rejected_rewards)``; the
rewards are the objective's implicit rewards, with no gradient. ``evaluate`` adds the optional NLL term
and the metrics, under TRL's names.

Conventions: for a pair, ``Δθ = log πθ(y_w|x) - log πθ(y_l|x)`` and ``Δref`` likewise for the reference,
so DPO's logit is ``β (Δθ - Δref)``. A worked check: Δθ = 2.5, Δref = -0.5, β = 0.1 → loss 0.55436.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from core.objectives.ops import Array, ArrayOps


@dataclass(frozen=True)
class PolicyOutputs:
    """Summed response log-probs and response lengths for a batch of pairs (all shaped [B])."""

    chosen_logps: Array
    rejected_logps: Array
    chosen_lengths: Array
    rejected_lengths: Array
    reference_chosen_logps: Array | None = None
    reference_rejected_logps: Array | None = None


def _smoothed_sigmoid_loss(ops: ArrayOps, logits: Array, label_smoothing: float, robust: bool) -> Array:
    """-log σ(x), with the preference label flipped with probability ε.

    Conservative DPO (cDPO; Mitchell, 2023): -(1-ε) log σ(x) - ε log σ(-x).
    Robust DPO (Chowdhury et al., 2024, eq. 8): [-(1-ε) log σ(x) + ε log σ(-x)] / (1 - 2ε), an unbiased
    estimate of the clean loss under label noise ε.
    """
    if label_smoothing == 0.0:
        return -ops.log_sigmoid(logits)
    eps = label_smoothing
    if robust:
        return (-(1.0 - eps) * ops.log_sigmoid(logits) + eps * ops.log_sigmoid(-logits)) / (1.0 - 2.0 * eps)
    return -(1.0 - eps) * ops.log_sigmoid(logits) - eps * ops.log_sigmoid(-logits)


class Objective(ABC):
    """A per-pair preference loss."""

    name: ClassVar[str]
    is_reference_free: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        """(losses, chosen_rewards, rejected_rewards), each shaped [B]."""

    @staticmethod
    def _reference(out: PolicyOutputs) -> tuple[Array, Array]:
        if out.reference_chosen_logps is None or out.reference_rejected_logps is None:
            raise ValueError("this objective needs reference log-probs")
        return out.reference_chosen_logps, out.reference_rejected_logps


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

    def _log_ratios(self, out: PolicyOutputs) -> tuple[Array, Array]:
        ref_chosen, ref_rejected = self._reference(out)
        return out.chosen_logps - ref_chosen, out.rejected_logps - ref_rejected

    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        chosen_ratio, rejected_ratio = self._log_ratios(out)
        losses = _smoothed_sigmoid_loss(
            ops, self.beta * (chosen_ratio - rejected_ratio), self.label_smoothing, self.robust
        )
        return (losses, ops.stop_gradient(self.beta * chosen_ratio), ops.stop_gradient(self.beta * rejected_ratio))


@dataclass(frozen=True)
class LengthNormalizedDPO(DPO):
    """DPO on per-token log-ratios (as in Tülu 3's length-normalized DPO):
    L = -log σ(β [(log πθ(y_w) - log πref(y_w)) / |y_w| - (log πθ(y_l) - log πref(y_l)) / |y_l|]),
    which removes DPO's pull towards longer replies. Rewards: β (log πθ(y) - log πref(y)) / |y|.
    """

    name: ClassVar[str] = "dpo_norm"

    def _log_ratios(self, out: PolicyOutputs) -> tuple[Array, Array]:
        chosen_ratio, rejected_ratio = super()._log_ratios(out)
        return chosen_ratio / out.chosen_lengths, rejected_ratio / out.rejected_lengths


@dataclass(frozen=True)
class IPO(Objective):
    """Identity Preference Optimization (Azar et al., 2023, eq. 17): L = (h - 1/(2β))², where h is the
    difference of log-ratios. As in TRL, and as the paper's authors advised its maintainers, h uses
    per-token (length-averaged) log-ratios, so 1/(2β) keeps one scale whatever the reply lengths.
    Rewards: β (log πθ(y) - log πref(y)) / |y|.
    """

    beta: float = 0.1
    name: ClassVar[str] = "ipo"

    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        ref_chosen, ref_rejected = self._reference(out)
        chosen_ratio = (out.chosen_logps - ref_chosen) / out.chosen_lengths
        rejected_ratio = (out.rejected_logps - ref_rejected) / out.rejected_lengths
        gap = chosen_ratio - rejected_ratio - 1.0 / (2.0 * self.beta)
        return (gap * gap, ops.stop_gradient(self.beta * chosen_ratio), ops.stop_gradient(self.beta * rejected_ratio))


@dataclass(frozen=True)
class Hinge(Objective):
    """Hinge loss on the DPO logit: SLiC-HF's calibration loss (Zhao et al., 2023) in the reference-anchored
    form of RSO (Liu et al., 2024) and TRL's "hinge":
    L = max(0, 1 - β [(log πθ(y_w) - log πref(y_w)) - (log πθ(y_l) - log πref(y_l))]).
    Rewards: β (log πθ(y) - log πref(y)).
    """

    beta: float = 0.1
    name: ClassVar[str] = "hinge"

    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        ref_chosen, ref_rejected = self._reference(out)
        chosen_ratio = out.chosen_logps - ref_chosen
        rejected_ratio = out.rejected_logps - ref_rejected
        losses = ops.relu(1.0 - self.beta * (chosen_ratio - rejected_ratio))
        return (losses, ops.stop_gradient(self.beta * chosen_ratio), ops.stop_gradient(self.beta * rejected_ratio))


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
    is_reference_free: ClassVar[bool] = True

    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        chosen_reward = self.beta * out.chosen_logps / out.chosen_lengths
        rejected_reward = self.beta * out.rejected_logps / out.rejected_lengths
        losses = _smoothed_sigmoid_loss(
            ops, chosen_reward - rejected_reward - self.gamma, self.label_smoothing, robust=False
        )
        return losses, ops.stop_gradient(chosen_reward), ops.stop_gradient(rejected_reward)


@dataclass(frozen=True)
class SFT(Objective):
    """Supervised fine-tuning on the chosen replies: L = -log πθ(y_w) / |y_w| (per-token NLL).

    The DPO paper takes π_ref as the maximum-likelihood model on the chosen replies when no SFT model
    exists; this objective builds one. Its "rewards" are per-token log-probs, so rewards/accuracies tells
    how often the chosen reply is already the likelier one.
    """

    name: ClassVar[str] = "sft"
    is_reference_free: ClassVar[bool] = True

    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        chosen_mean = out.chosen_logps / out.chosen_lengths
        return (
            -chosen_mean,
            ops.stop_gradient(chosen_mean),
            ops.stop_gradient(out.rejected_logps / out.rejected_lengths),
        )


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (DPO, LengthNormalizedDPO, IPO, Hinge, SimPO, SFT)}


@dataclass(frozen=True)
class ObjectiveResult:
    loss: Array  # 0-d: the mean per-pair loss (plus the weighted NLL), what is differentiated
    losses: Array  # [B]
    chosen_rewards: Array  # [B], no gradient
    rejected_rewards: Array  # [B], no gradient
    metrics: dict[str, Array]  # 0-d arrays, no gradient


def evaluate(objective: Objective, ops: ArrayOps, out: PolicyOutputs, nll_weight: float = 0.0) -> ObjectiveResult:
    """The objective's losses plus ``nll_weight`` × the per-token NLL of the chosen replies (as in RPO,
    Pang et al., 2024), and the metrics: rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}.
    """
    losses, chosen_rewards, rejected_rewards = objective(ops, out)
    metrics: dict[str, Array] = {}
    if nll_weight:
        nll = -out.chosen_logps / out.chosen_lengths
        losses = losses + nll_weight * nll
        metrics["nll_loss"] = ops.stop_gradient(ops.mean(nll))
    loss = ops.mean(losses)
    metrics.update(
        {
            "loss": ops.stop_gradient(loss),
            "rewards/chosen": ops.mean(chosen_rewards),
            "rewards/rejected": ops.mean(rejected_rewards),
            "rewards/margins": ops.mean(chosen_rewards - rejected_rewards),
            "rewards/accuracies": ops.mean(ops.greater(chosen_rewards, rejected_rewards)),
            "logps/chosen": ops.stop_gradient(ops.mean(out.chosen_logps)),
            "logps/rejected": ops.stop_gradient(ops.mean(out.rejected_logps)),
        }
    )
    return ObjectiveResult(loss, losses, chosen_rewards, rejected_rewards, metrics)
