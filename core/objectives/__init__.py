"""The preference objectives, shared by every backend through a tiny array-ops interface."""

from __future__ import annotations

from core.objectives.losses import (
    DPO,
    IPO,
    OBJECTIVES,
    SFT,
    Hinge,
    LengthNormalizedDPO,
    Objective,
    ObjectiveResult,
    PolicyOutputs,
    SimPO,
    evaluate,
)
from core.objectives.ops import ArrayOps, NumpyOps

__all__ = [
    "DPO",
    "IPO",
    "OBJECTIVES",
    "SFT",
    "ArrayOps",
    "Hinge",
    "LengthNormalizedDPO",
    "NumpyOps",
    "Objective",
    "ObjectiveResult",
    "PolicyOutputs",
    "SimPO",
    "build_objective",
    "evaluate",
]


def build_objective(config) -> Objective:
    """The objective an ``ObjectiveConfig`` describes, with per-objective defaults filled in."""
    beta = config.resolved_beta
    if config.name == "dpo":
        return DPO(beta, config.label_smoothing, config.robust)
    if config.name == "dpo_norm":
        return LengthNormalizedDPO(beta, config.label_smoothing, config.robust)
    if config.name == "simpo":
        return SimPO(beta, config.resolved_gamma, config.label_smoothing)
    if config.name == "ipo":
        return IPO(beta)
    if config.name == "hinge":
        return Hinge(beta)
    if config.name == "sft":
        return SFT()
    raise ValueError(f"unknown objective {config.name!r}")
