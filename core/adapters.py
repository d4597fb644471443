"""LoRA adapters in both ecosystems' formats, and exact conversion between them.

PEFT (``adapter_model.safetensors`` + ``adapter_config.json``):
    key ``base_model.model.<module>.lora_A.weight`` of shape [r, in], ``...lora_B.weight`` of shape [out, r];
    the update is ``(lora_alpha / r) · B A`` (``lora_alpha / √r`` with rsLoRA); ``target_modules`` and
    ``layers_to_transform`` say where.
mlx-lm (``adapters.safetensors`` + ``adapter_config.json``):
    key ``<module>.lora_a`` of shape [in, r], ``<module>.lora_b`` of shape [r, out]; the update is
    ``scale · (x a) b``; ``lora_parameters.keys`` are module paths inside a block, applied to the last
    ``num_layers`` blocks.

So ``lora_a = Aᵀ``, ``lora_b = Bᵀ`` and ``scale = lora_alpha / r``. PEFT can adapt any set of layers while
mlx-lm adapts the last N; a PEFT adapter on layers {1, 3} of 4 becomes an mlx-lm adapter on the last 3
with zero weights on layer 2, which changes nothing (a zero update is exactly zero).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import write_json, write_safetensors
from core.errors import DuetError

PEFT_WEIGHTS, MLX_WEIGHTS, CONFIG = "adapter_model.safetensors", "adapters.safetensors", "adapter_config.json"
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")
_MLX_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[ab])$")
_LAYER = re.compile(r"^(?P<prefix>.*?layers)\.(?P<index>\d+)\.(?P<key>.+)$")


class AdapterError(DuetError):
    """An adapter folder that cannot be read, converted or applied."""


@dataclass
class Adapter:
    """A LoRA adapter in a neutral form: per module (full path, e.g. ``model.layers.3.mlp.up_proj``) the
    matrices A [r, in] and B [out, r] of ``W + scale · B A``."""

    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    rank: int
    scale: float
    dropout: float = 0.0
    base_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what else the source config said

    @property
    def alpha(self) -> float:
        return self.scale * self.rank

    def layer_keys(self) -> tuple[str, set[int], list[str]]:
        """(the blocks' path prefix, the adapted block indices, module keys inside a block)."""
        prefixes, layers, keys = set(), set(), set()
        for module in self.a:
            match = _LAYER.match(module)
            if match is None:
                raise AdapterError(f"LoRA on '{module}', outside the transformer blocks, has no mlx-lm equivalent.")
            prefixes.add(match["prefix"])
            layers.add(int(match["index"]))
            keys.add(match["key"])
        if len(prefixes) != 1:
            raise AdapterError(f"LoRA modules under several block lists ({sorted(prefixes)}) are not supported.")
        return prefixes.pop(), layers, sorted(keys)


def adapter_format(folder: str | Path) -> str:
    folder = Path(folder)
    if (folder / PEFT_WEIGHTS).is_file():
        return "peft"
    if (folder / MLX_WEIGHTS).is_file():
        return "mlx"
    raise AdapterError(f"{folder}: no adapter here (expected {PEFT_WEIGHTS} for PEFT or {MLX_WEIGHTS} for mlx-lm).")


def _config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise AdapterError(f"{folder}: {CONFIG} is missing.") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{folder}/{CONFIG}: not readable JSON ({exc}).") from None


def _weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise AdapterError(f"{path}: not a readable safetensors file ({exc}).") from None


def read_adapter(folder: str | Path) -> Adapter:
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder.")
    return read_peft(folder) if adapter_format(folder) == "peft" else read_mlx(folder)


def read_peft(folder: Path) -> Adapter:
    config = _config(folder)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder}: a {config.get('peft_type')} adapter; only LoRA converts.")
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if config.get(unsupported):
            raise AdapterError(f"{folder}: per-module ranks or alphas ({unsupported}) have no mlx-lm equivalent.")
    if config.get("use_dora"):
        raise AdapterError(f"{folder}: DoRA adapters are not converted.")
    rank = int(config["r"])
    scale = float(config["lora_alpha"]) / (rank**0.5 if config.get("use_rslora") else rank)
    a, b = {}, {}
    for key, value in _weights(folder / PEFT_WEIGHTS).items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise AdapterError(f"{folder}/{PEFT_WEIGHTS}: unexpected tensor '{key}' (only LoRA A/B weights convert).")
        (a if match["which"] == "A" else b)[match["module"]] = value.astype(np.float32)
    if a.keys() != b.keys():
        raise AdapterError(f"{folder}: LoRA A and B weights do not pair up.")
    return Adapter(
        a, b, rank, scale, float(config.get("lora_dropout", 0.0)), config.get("base_model_name_or_path"), config
    )


def read_mlx(folder: Path) -> Adapter:
    config = _config(folder)
    if config.get("fine_tune_type", "lora") != "lora":
        raise AdapterError(f"{folder}: a '{config.get('fine_tune_type')}' adapter; only LoRA converts.")
    params = config.get("lora_parameters") or {}
    a, b = {}, {}
    for key, value in _weights(folder / MLX_WEIGHTS).items():
        match = _MLX_KEY.match(key)
        if match is None:
            raise AdapterError(f"{folder}/{MLX_WEIGHTS}: unexpected tensor '{key}' (only LoRA a/b weights convert).")
        (a if match["which"] == "a" else b)[match["module"]] = value.astype(np.float32).T
    if a.keys() != b.keys():
        raise AdapterError(f"{folder}: LoRA a and b weights do not pair up.")
    rank = int(params.get("rank") or next(iter(a.values())).shape[0])
    return Adapter(
        a,
        b,
        rank,
        float(params.get("scale", 20.0)),
        float(params.get("dropout", 0.0)),
        config.get("base_model") or config.get("model"),
        config,
    )


def peft_tensors(adapter: Adapter) -> dict[str, np.ndarray]:
    tensors = {}
    for module in sorted(adapter.a):
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(adapter.a[module])
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(adapter.b[module])
    return tensors


def sort_target_modules(folder: Path) -> None:
    """PEFT writes ``target_modules`` from a set, in an order that changes from one process to the next (string
    hashing): sorted, the same adapter is the same file, and what is keyed on it by content (the reference
    cache of a round that starts from it) finds it again."""
    path = Path(folder) / CONFIG
    config = json.loads(path.read_text())
    modules = config.get("target_modules")
    if isinstance(modules, list) and modules != sorted(modules):
        config["target_modules"] = sorted(modules)
        write_json(path, config)


def write_peft(folder: Path, adapter: Adapter, num_layers: int) -> None:
    """Write ``adapter`` in PEFT's format into ``folder`` (which exists)."""
    _, layers, keys = adapter.layer_keys()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": keys,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None if layers == set(range(num_layers)) else sorted(layers),
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": adapter.base_model,
        "revision": None,
    }
    write_safetensors(folder / PEFT_WEIGHTS, peft_tensors(adapter), metadata={"format": "pt"})
    write_json(folder / CONFIG, config)


def mlx_tensors(adapter: Adapter, num_layers: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """mlx-lm tensors and ``lora_parameters``; blocks between the first adapted one and the last get zero
    matrices where the source had none (mlx-lm adapts a contiguous run of final blocks)."""
    prefix, layers, keys = adapter.layer_keys()
    first = min(layers)
    shapes = {}
    for module, a in adapter.a.items():
        shapes[_LAYER.match(module)["key"]] = (a.shape, adapter.b[module].shape)
    tensors = {}
    for index in range(first, num_layers):
        for key in keys:
            module = f"{prefix}.{index}.{key}"
            a_shape, b_shape = shapes[key]
            a = adapter.a.get(module, np.zeros(a_shape, np.float32))
            b = adapter.b.get(module, np.zeros(b_shape, np.float32))
            tensors[f"{module}.lora_a"] = np.ascontiguousarray(a.T)
            tensors[f"{module}.lora_b"] = np.ascontiguousarray(b.T)
    parameters = {"rank": adapter.rank, "scale": adapter.scale, "dropout": adapter.dropout, "keys": keys}
    return tensors, {"fine_tune_type": "lora", "num_layers": num_layers - first, "lora_parameters": parameters}


def write_mlx(folder: Path, adapter: Adapter, num_layers: int) -> None:
    """Write ``adapter`` in mlx-lm's format into ``folder`` (which exists)."""
    tensors, config = mlx_tensors(adapter, num_layers)
    if adapter.base_model:  # mlx-lm's own adapters record the base under "model"; older Duet read "base_model"
        config["model"] = config["base_model"] = adapter.base_model
    write_safetensors(folder / MLX_WEIGHTS, tensors)
    write_json(folder / CONFIG, config)
