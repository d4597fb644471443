"""A float64 NumPy reference for every objective, written straight from the papers' formulas.

It shares no code with ``losses.py`` on purpose: tests check the shared objectives (on NumPy, torch and
MLX) against it, and its gradients against finite differences.
"""

from __future__ import annotations

import numpy as np


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    # log σ(x) = -log(1 + e^{-x}), via logaddexp so large |x| neither overflows nor loses precision
    return -np.logaddexp(0.0, -x)


def reference_losses(
    name: str,
    policy_chosen: np.ndarray,
    policy_rejected: np.ndarray,
    chosen_lengths: np.ndarray,
    rejected_lengths: np.ndarray,
    reference_chosen: np.ndarray | None = None,
    reference_rejected: np.ndarray | None = None,
    *,
    beta: float = 0.1,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
    robust: bool = False,
    nll_weight: float = 0.0,
    labels: np.ndarray | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl_estimate: float | None = None,
) -> dict[str, np.ndarray]:
    """Per-pair losses and rewards, the mean loss, and the metrics, all in float64. KTO: ``labels`` rate each
    example; ``kl_estimate`` holds z0 fixed (the objective detaches it: finite differences must too)."""
    pc, pr = np.float64(policy_chosen), np.float64(policy_rejected)
    extra: dict[str, np.ndarray] = {}  # an objective's own metrics
    lc, lr = np.float64(chosen_lengths), np.float64(rejected_lengths)
    if name in ("dpo", "dpo_norm", "ipo", "hinge"):
        rc, rr = np.float64(reference_chosen), np.float64(reference_rejected)
        ratio_chosen, ratio_rejected = pc - rc, pr - rr
        if name in ("dpo_norm", "ipo"):
            ratio_chosen, ratio_rejected = ratio_chosen / lc, ratio_rejected / lr
        chosen_rewards, rejected_rewards = beta * ratio_chosen, beta * ratio_rejected
        h = ratio_chosen - ratio_rejected
        if name == "ipo":
            losses = (h - 1.0 / (2.0 * beta)) ** 2
        elif name == "hinge":
            losses = np.maximum(0.0, 1.0 - beta * h)
        else:
            losses = _label_noise_loss(beta * h, label_smoothing, robust)
    elif name == "simpo":
        chosen_rewards, rejected_rewards = beta * pc / lc, beta * pr / lr
        losses = _label_noise_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing, False)
    elif name == "orpo":  # Hong et al., 2024, eq. 6-7; λ is beta
        mean_chosen, mean_rejected = pc / lc, pr / lr
        # log(1 - e^x) straight from its definition, in float64 via expm1 (exact for the x ≤ 0 tested)
        log_odds = (mean_chosen - np.log(-np.expm1(mean_chosen))) - (mean_rejected - np.log(-np.expm1(mean_rejected)))
        chosen_rewards, rejected_rewards = beta * mean_chosen, beta * mean_rejected
        losses = -mean_chosen - beta * _log_sigmoid(log_odds)
        extra = {
            "nll_loss": (-mean_chosen).mean(),
            "log_odds_ratio": _log_sigmoid(log_odds).mean(),
            "log_odds_chosen": log_odds.mean(),
            "logps/chosen": mean_chosen.mean(),
            "logps/rejected": mean_rejected.mean(),
        }
    elif name == "kto":  # Ethayarajh et al., 2024, eq. 8, with TRL's z0: the clamped mean mismatched log-ratio
        desirable = np.asarray(labels, dtype=bool)
        ratio = pc - np.float64(reference_chosen)
        z0 = max(float(np.mean(pr - np.float64(reference_rejected))), 0.0) if kl_estimate is None else kl_estimate
        value = np.where(
            desirable,
            desirable_weight / (1.0 + np.exp(-beta * (ratio - z0))),
            undesirable_weight / (1.0 + np.exp(-beta * (z0 - ratio))),
        )
        losses = np.where(desirable, desirable_weight, undesirable_weight) - value  # λ_y − v(x, y)
        signed = np.where(desirable, 1.0, -1.0) * beta * (ratio - z0)
        chosen_rewards, rejected_rewards = signed, np.zeros_like(signed)
        good, bad = beta * ratio[desirable], beta * ratio[~desirable]
        extra = {
            "kl": np.float64(z0),
            "rewards/chosen": good.mean() if good.size else np.float64(0.0),
            "rewards/rejected": bad.mean() if bad.size else np.float64(0.0),
            "rewards/accuracies": np.where(desirable, ratio > z0, ratio < z0).mean(),
            "logps/chosen": pc[desirable].mean() if good.size else np.float64(0.0),
            "logps/rejected": pc[~desirable].mean() if bad.size else np.float64(0.0),
        }
        extra["rewards/margins"] = extra["rewards/chosen"] - extra["rewards/rejected"]
    elif name == "sft":
        chosen_rewards, rejected_rewards = pc / lc, pr / lr
        losses = -pc / lc
    else:
        raise ValueError(f"no reference for objective {name!r}")
    metrics = {}
    if nll_weight:
        nll = -pc / lc
        losses = losses + nll_weight * nll
        metrics["nll_loss"] = nll.mean()
    metrics.update(
        {
            "loss": losses.mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).mean(),
            "logps/chosen": pc.mean(),
            "logps/rejected": pr.mean(),
        }
    )
    metrics.update(extra)
    return {
        "losses": losses,
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "loss": losses.mean(),
        "metrics": metrics,
    }


def _label_noise_loss(x: np.ndarray, eps: float, robust: bool) -> np.ndarray:
    clean, flipped = -_log_sigmoid(x), -_log_sigmoid(-x)
    if robust:
        return ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)
    return (1 - eps) * clean + eps * flipped
