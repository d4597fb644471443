"""What every objective shares: its declaration and registry, the inputs, and ``evaluate`` (loss and metrics).

Each objective is one module of this package, written once against ``ArrayOps`` so every backend shares the
maths.

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
from typing import Any, ClassVar

import numpy as np

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
    labels: Array | None = None  # [B], 1.0 desirable / 0.0 undesirable: unpaired examples (KTO) only

    @classmethod
    def from_rows(
        cls, logps: Array, lengths: Array, reference: Array | None, labels: Array | None = None
    ) -> PolicyOutputs:
        """From a batch's row layout, ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`` (all [2B]);
        ``labels`` [B] for unpaired examples, whose rejected rows are their mismatched replies."""
        pairs = lengths.shape[0] // 2
        return cls(
            logps[:pairs],
            logps[pairs:],
            lengths[:pairs],
            lengths[pairs:],
            None if reference is None else reference[:pairs],
            None if reference is None else reference[pairs:],
            labels,
        )


def smoothed_sigmoid_loss(ops: ArrayOps, logits: Array, label_smoothing: float, robust: bool) -> Array:
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


OBJECTIVES: dict[str, type[Objective]] = {}  # every declared objective by name, in the order declared


class Objective(ABC):
    """A per-pair preference loss, declared once: a subclass with a ``name`` registers itself, and the config
    (names, defaults, validation), ``--help``, the TUI and the model card read its declaration.

    Declaration: ``name``; ``summary`` (one line of help); ``is_reference_free``; ``unpaired`` (it trains on
    rated single replies, KTO, rather than pairs); ``per_example_loss`` (each example's loss depends on its own
    rows alone; False for KTO, whose reference point is a batch statistic); ``default_beta`` (None: the
    objective takes no β); ``options``, the optional settings it accepts among ``label_smoothing``,
    ``robust``, ``gamma``, ``desirable_weight`` and ``undesirable_weight``. ``from_config`` builds it from an
    ``ObjectiveConfig``; ``check_config`` adds checks of its own.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    is_reference_free: ClassVar[bool] = False
    unpaired: ClassVar[bool] = False
    # each example's loss depends on its own rows only (not on a batch statistic such as KTO's z0), so a step
    # may run pair by pair and add up the gradients
    per_example_loss: ClassVar[bool] = True
    default_beta: ClassVar[float | None] = 0.1
    options: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is not None:
            if name in OBJECTIVES and OBJECTIVES[name].__qualname__ != cls.__qualname__:
                raise TypeError(
                    f"two objectives are named {name!r}: {OBJECTIVES[name].__qualname__} and {cls.__qualname__}"
                )
            OBJECTIVES[name] = cls

    @classmethod
    def from_config(cls, config: Any) -> Objective:
        """The objective an ``ObjectiveConfig`` asks for (its β, or this objective's default)."""
        return cls(config.resolved_beta) if cls.default_beta is not None else cls()

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Checks of this objective's own settings, beyond the declaration's (raise ConfigError)."""
        return None  # most objectives have none

    @abstractmethod
    def __call__(self, ops: ArrayOps, out: PolicyOutputs) -> tuple[Array, Array, Array]:
        """(losses, chosen_rewards, rejected_rewards), each shaped [B]."""

    def metrics(self, ops: ArrayOps, out: PolicyOutputs) -> dict[str, Array]:
        """Metrics of this objective's own (no gradient), added to (or replacing) the common ones."""
        return {}

    @staticmethod
    def _reference(out: PolicyOutputs) -> tuple[Array, Array]:
        if out.reference_chosen_logps is None or out.reference_rejected_logps is None:
            raise ValueError("this objective needs reference log-probs")
        return out.reference_chosen_logps, out.reference_rejected_logps


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
    metrics.update(objective.metrics(ops, out))
    return ObjectiveResult(loss, losses, chosen_rewards, rejected_rewards, metrics)


def metric_names(objective: Objective, nll_weight: float) -> list[str]:
    """The metrics ``evaluate`` reports for this objective, sorted (found by evaluating one made-up pair)."""
    from core.objectives.ops import NumpyOps

    one = np.ones(1)
    labels = one if objective.unpaired else None
    outputs = PolicyOutputs(one, one, one, one, one, one, labels)
    return sorted(evaluate(objective, NumpyOps(), outputs, nll_weight).metrics)
