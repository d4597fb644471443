"""ORPO: supervised fine-tuning and a preference term in one pass, with no reference model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from core.errors import ConfigError
from core.objectives.base import Objective, PolicyOutputs
from core.objectives.ops import Array, ArrayOps


@dataclass(frozen=True)
class ORPO(Objective):
    """Odds Ratio Preference Optimization (Hong et al., 2024, eq. 6–7), reference-free:
    L = L_SFT + λ · L_OR, with L_SFT = −log πθ(y_w|x) / |y_w| (the chosen reply's per-token NLL) and
    L_OR = −log σ(log odds(y_w) − log odds(y_l)), odds(y) = P(y|x) / (1 − P(y|x)) where P(y|x) is the
    length-averaged probability exp(log πθ(y|x) / |y|), so log odds = p̄ − log(1 − e^p̄) (``log1mexp``).
    λ is ``objective.beta`` (TRL's name for it), 0.1 by default as in the paper.

    Rewards and metrics follow TRL's ORPOTrainer: rewards λ·p̄, ``log_odds_ratio`` the mean of log σ(log odds
    ratio), ``log_odds_chosen`` the mean log odds ratio, and ``logps/*`` the average (per-token) log-probs.
    Where TRL differs from the paper, this follows the paper: TRL's NLL term is a token-weighted mean over the
    whole batch and counts the prompt's tokens too; here it is each chosen reply's per-token NLL, averaged over
    pairs (eq. 2 and 6).
    """

    beta: float = 0.1
    name: ClassVar[str] = "orpo"
    summary: ClassVar[str] = (
        "ORPO: SFT on the chosen replies plus λ × an odds-ratio preference term, no reference model (β is λ; "
        "0.1 as in the paper)"
    )
    is_reference_free: ClassVar[bool] = True
    default_beta: ClassVar[float | None] = 0.1

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.nll_weight:
            raise ConfigError(
                "objective.nll_weight: ORPO has its own NLL term (L = L_SFT + λ·L_OR); set objective.nll_weight=0 "
                "(the demo's run.yaml sets 1.0 for DPO)."
            )

    def log_odds(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        """(p̄ chosen, p̄ rejected, log odds(y_w) − log odds(y_l))."""
        chosen = out.chosen_logps / out.chosen_lengths
        rejected = out.rejected_logps / out.rejected_lengths
        return chosen, rejected, (chosen - rejected) - (ops.log1mexp(chosen) - ops.log1mexp(rejected))

    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        chosen, rejected, ratio = self.log_odds(ops, out)
        losses = -chosen - self.beta * ops.log_sigmoid(ratio)
        return losses, ops.stop_gradient(self.beta * chosen), ops.stop_gradient(self.beta * rejected)

    def metrics(self, ops: ArrayOps, out: PolicyOutputs) -> dict[str, Array]:
        chosen, rejected, ratio = self.log_odds(ops, out)
        return {
            "nll_loss": ops.stop_gradient(ops.mean(-chosen)),
            "log_odds_ratio": ops.stop_gradient(ops.mean(ops.log_sigmoid(ratio))),
            "log_odds_chosen": ops.stop_gradient(ops.mean(ratio)),
            "logps/chosen": ops.stop_gradient(ops.mean(chosen)),
            "logps/rejected": ops.stop_gradient(ops.mean(rejected)),
        }
