"""A model's config.json as transformers 4, transformers 5 and mlx-lm each read it, made to agree.

transformers 5 saves the rotary settings as ``"rope_parameters": {"rope_theta": …, "rope_type": …, …}`` and no
longer writes the top-level ``rope_theta`` and ``rope_scaling`` that transformers 4 wrote. mlx-lm 0.32 reads only
the top-level keys for llama (and mistral, which it builds as llama) and qwen2, and silently falls back to its own
default base (10,000 for llama, 1,000,000 for qwen2): a different model. This module says which rotary settings
transformers computes with, turns them into mlx-lm's ``model_config`` overrides (refusing what mlx-lm cannot
compute the same way), and writes both forms into the configs Duet saves.

Plain dictionaries only (no mlx import), so the export and ``duet doctor`` use it on any machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.models_io import ModelError

# The base transformers uses for these architectures when a config names none (mlx-lm's qwen2 default differs).
DEFAULT_THETA = 10000.0
# Architectures whose mlx-lm model arguments Duet has checked against what transformers 5 writes: the rotary
# keys are the only ones renamed (mlx-lm builds mistral as llama).
CHECKED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The rope types mlx-lm's initialize_rope computes as transformers does (the parity tests cover each), and the
# rope_parameters fields it reads for each. "longrope" is left out: mlx-lm applies its long factors at every
# length, transformers only past original_max_position_embeddings.
ROPE_FIELDS: dict[str, frozenset[str]] = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor"}),  # both grow the base only past max_position_embeddings
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
    "yarn": frozenset(
        {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
    ),
}
NAMING_FIELDS = frozenset({"rope_type", "type", "rope_theta"})
# mlx-lm's llama and qwen models have no sliding-window attention for these configs: fine for shorter sequences.
SLIDING_KEYS = ("sliding_window", "use_sliding_window")


@dataclass
class Rope:
    """The rotary settings transformers computes with: its base and, when not plain RoPE, the scaling."""

    theta: float
    rope_type: str
    fields: dict[str, Any]  # the rope_parameters fields besides rope_type and rope_theta

    def scaling(self) -> dict[str, Any] | None:
        """transformers 4's (and mlx-lm's) ``rope_scaling``: None for plain RoPE with nothing else said."""
        if self.rope_type == "default" and not self.fields:
            return None
        return {"rope_type": self.rope_type, **self.fields}

    def parameters(self) -> dict[str, Any]:
        """transformers 5's ``rope_parameters``."""
        return {"rope_theta": self.theta, "rope_type": self.rope_type, **self.fields}


def read_config(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    """A model folder's config.json: its path and contents."""
    path = Path(folder) / "config.json"
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the model config ({exc}).") from None


def rope(config: dict[str, Any]) -> Rope | None:
    """The rotary settings as the installed transformers (5) reads them: ``rope_scaling`` when present (it wins
    over ``rope_parameters``), else ``rope_parameters``; the base from that dict, else the top-level
    ``rope_theta``. None for a config without a single, flat rope setting (rope per layer type, or no rope)."""
    parameters = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(parameters, dict) or any(isinstance(value, dict) for value in parameters.values()):
        return None  # nested per layer type (e.g. gemma3): not a form Duet rewrites
    if not parameters and "rope_theta" not in config and config.get("model_type") not in CHECKED_TYPES:
        return None
    theta = parameters.get("rope_theta", config.get("rope_theta") or DEFAULT_THETA)
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    fields = {key: value for key, value in parameters.items() if key not in NAMING_FIELDS}
    return Rope(float(theta), str(rope_type), fields)


def with_both_rope_forms(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its rotary settings written both ways: top-level ``rope_theta``/``rope_scaling`` (what
    transformers 4 and mlx-lm read) and ``rope_parameters`` (transformers 5). Configs whose rope is nested or
    absent come back unchanged."""
    settings = rope(config)
    if settings is None:
        return config
    both = {
        **config,
        "rope_theta": settings.theta,
        "rope_scaling": settings.scaling(),
        "rope_parameters": settings.parameters(),
    }
    if "partial_rotary_factor" in settings.fields:  # transformers 5 moved it in, 4 reads it at the top level
        both.setdefault("partial_rotary_factor", settings.fields["partial_rotary_factor"])
    return both


def mlx_overrides(config: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """The ``model_config`` for ``mlx_lm.load`` that makes mlx-lm build the model transformers builds from
    ``config`` (read from ``source``), and warnings about keys mlx-lm ignores. Raises ModelError for a rotary
    setting mlx-lm cannot compute as transformers does."""
    model_type = config.get("model_type")
    settings = rope(config)
    if model_type not in CHECKED_TYPES or settings is None:
        if "rope_parameters" in config and "rope_theta" not in config:
            return {}, [
                f"{source}: Duet checks flat rope settings of {', '.join(CHECKED_TYPES)} models only; mlx-lm may "
                f"not read this {model_type} model's rope_parameters (compare MLX and torch log-probs)."
            ]
        return {}, []
    if settings.rope_type not in ROPE_FIELDS:
        key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
        raise ModelError(
            f"{source}: {key}.rope_type '{settings.rope_type}' is a rotary scaling Duet cannot carry over to "
            f"mlx-lm the way transformers computes it (it can: {', '.join(ROPE_FIELDS)}). Use the torch backend "
            "for this model."
        )
    partial = settings.fields.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ModelError(
            f"{source}: partial_rotary_factor {partial}: mlx-lm's {model_type} rotates every dimension. Use the "
            "torch backend for this model."
        )
    warnings = [
        f"{source}: rope_parameters.{key} ({settings.fields[key]!r}) has no counterpart in mlx-lm's "
        f"'{settings.rope_type}' rope; the MLX model may differ from transformers'."
        for key in sorted(set(settings.fields) - ROPE_FIELDS[settings.rope_type] - {"partial_rotary_factor"})
    ]
    if config.get("sliding_window") and (config.get("use_sliding_window", model_type == "mistral")):
        warnings.append(
            f"{source}: sliding_window {config['sliding_window']} is ignored by mlx-lm's {model_type}: sequences "
            "longer than the window attend differently than in transformers."
        )
    return {"rope_theta": settings.theta, "rope_scaling": settings.scaling()}, warnings


def config_warnings(folder: str | Path) -> list[str]:
    """What ``duet doctor`` says about a model folder's config: keys mlx-lm ignores, rope it cannot map."""
    path, config = read_config(folder)
    try:
        return mlx_overrides(config, str(path))[1]
    except ModelError as exc:
        return [str(exc)]
