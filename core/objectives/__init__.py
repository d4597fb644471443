"""The preference objectives, shared by every backend through a tiny array-ops interface.

Each objective is one module of this package that declares an `Objective` subclass; importing the package
imports every such module, so the subclass registers itself in `OBJECTIVES` and the config, ``--help``, the
TUI and the model card know it. Adding an objective means adding its module (and its tests).
"""

from __future__ import annotations

import importlib
import pkgutil

from core.objectives.base import OBJECTIVES, Objective, ObjectiveResult, PolicyOutputs, evaluate, metric_names
from core.objectives.ops import ArrayOps, NumpyOps

_NOT_OBJECTIVES = {"base", "ops", "reference"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _NOT_OBJECTIVES:
        importlib.import_module(f"{__name__}.{_module.name}")

from core.objectives.dpo import DPO  # noqa: E402 - the classes tests and benchmarks name directly
from core.objectives.dpo_norm import LengthNormalizedDPO  # noqa: E402
from core.objectives.hinge import Hinge  # noqa: E402
from core.objectives.ipo import IPO  # noqa: E402
from core.objectives.kto import KTO  # noqa: E402
from core.objectives.orpo import ORPO  # noqa: E402
from core.objectives.sft import SFT  # noqa: E402
from core.objectives.simpo import SimPO  # noqa: E402

__all__ = [
    "DPO",
    "IPO",
    "KTO",
    "OBJECTIVES",
    "ORPO",
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
    "metric_names",
]


def build_objective(config) -> Objective:
    """The objective an ``ObjectiveConfig`` describes, with its declared defaults filled in."""
    if config.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {config.name!r}")
    return OBJECTIVES[config.name].from_config(config)
