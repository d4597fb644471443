"""``duet export``: an adapter (or a run's) to PEFT, to mlx-lm, or fused into a full merged model.

Every export is built in a temporary folder and renamed into place; an existing non-empty folder is
never overwritten without ``force``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.adapters import Adapter, AdapterError, read_adapter, write_mlx, write_peft
from core.atomic import atomic_directory, recover, write_json
from core.checkpoint import STATE_FILE, latest_checkpoint, read_state
from core.weights import from_float32, read_tensors, to_float32, write_tensors

FORMATS = ("peft", "mlx", "merged")
# Files a merged model folder takes from its base model besides the weights.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class AdapterSource:
    """Where an export reads its adapter from, and which training step that adapter is."""

    folder: Path
    base_model: str | None = None  # the run's model, when the source is a run or one of its checkpoints
    step: int | None = None  # optimizer steps the adapter was trained for, when known
    total_steps: int | None = None
    checkpoint: bool = False  # a checkpoint, not a finished run's final adapter
    newest: bool = False  # the newest checkpoint of a run that has no final adapter (stopped or still training)

    def describe(self) -> str:
        if self.step is None:
            return f"the adapter in {self.folder}"
        if self.newest:
            return (
                f"the newest checkpoint, step {self.step} of {self.total_steps} (the run has no final adapter), "
                f"in {self.folder}"
            )
        what = "checkpoint" if self.checkpoint else "final adapter"
        return f"the {what} at step {self.step} of {self.total_steps}, in {self.folder}"


def adapter_source(path: str | Path) -> AdapterSource:
    """The adapter of a run directory (its final adapter, else its newest checkpoint), a checkpoint, or an
    adapter folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AdapterError(f"{path}: no such run, checkpoint or adapter folder.")
    if (path / STATE_FILE).is_file():  # a checkpoint given directly (its adapter records the base model)
        return _with_step(AdapterSource(path, checkpoint=True), path)
    if not (path / "config.yaml").is_file():
        return AdapterSource(path)
    base = _run_model(path)
    if (path / "adapter").is_dir():
        return _with_step(AdapterSource(path / "adapter", base), latest_checkpoint(path))
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise AdapterError(f"{path}: this run has no final adapter and no checkpoint yet.")
    return _with_step(AdapterSource(checkpoint, base, checkpoint=True, newest=True), checkpoint)


def _run_model(run_dir: Path) -> str | None:
    import yaml

    return (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("model", {}).get("path")


def _with_step(source: AdapterSource, checkpoint: Path | None) -> AdapterSource:
    """The step of a checkpoint; for a final adapter, the run's total (its newest checkpoint says how many)."""
    if checkpoint is not None:
        state = read_state(checkpoint)
        source.total_steps = state.total_steps
        source.step = state.step if source.checkpoint else state.total_steps
    return source


def resolve_base_model(adapter: Adapter, base_model: str | None) -> Path:
    """The base model's local folder: given, recorded in the adapter, or resolved from the hub cache."""
    from core.models_io import resolve_model_path

    name = base_model or adapter.base_model
    if not name:
        raise AdapterError("the adapter does not say which base model it belongs to; pass --base-model PATH.")
    location = resolve_model_path(name)
    if Path(location).is_dir():
        return Path(location)
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(location, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
        )
    except Exception as exc:  # the hub raises many error types; the user needs the name and the reason
        raise AdapterError(f"base model {name}: not a local folder and not reachable on the hub ({exc}).") from None


def num_hidden_layers(model_folder: Path) -> int:
    config = json.loads((model_folder / "config.json").read_text())
    config = config.get("text_config", config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    raise AdapterError(f"{model_folder}/config.json: cannot tell how many layers the model has.")


@dataclass
class ExportResult:
    out: Path
    source: AdapterSource  # what was exported: its folder and, for a run or checkpoint, its step


def export(source: str | Path, to: str, out: str | Path, *, base_model: str | None = None, force: bool = False) -> Path:
    """Write the adapter found at ``source`` to ``out`` as ``to`` (peft | mlx | merged). Returns ``out``."""
    return export_adapter(source, to, out, base_model=base_model, force=force).out


def export_adapter(
    source: str | Path, to: str, out: str | Path, *, base_model: str | None = None, force: bool = False
) -> ExportResult:
    """``export``, also saying what was exported: a stopped run's newest checkpoint is named with its step."""
    if to not in FORMATS:
        raise AdapterError(f"--to {to}: choose one of {', '.join(FORMATS)}.")
    out = Path(out).expanduser()
    recover(out)  # an export that was killed while replacing this folder left the previous one aside
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise AdapterError(f"{out} exists and is not empty; choose another folder or pass --force to replace it.")
    found = adapter_source(source)
    folder = found.folder
    adapter = read_adapter(folder)
    model = resolve_base_model(adapter, base_model or found.base_model)
    adapter.base_model = adapter.base_model or str(model)
    layers = num_hidden_layers(model)
    with atomic_directory(out, replace=True) as temporary:
        if to == "peft":
            write_peft(temporary, adapter, layers)
        elif to == "mlx":
            write_mlx(temporary, adapter, layers)
        else:
            write_merged(temporary, model, adapter)
        readme = folder / "README.md"
        if to != "merged" and readme.is_file():
            shutil.copyfile(readme, temporary / "README.md")
    return ExportResult(out, found)


def write_merged(folder: Path, model: Path, adapter: Adapter) -> None:
    """The base model with ``W + scale · B A`` fused into every adapted weight, in the base's own dtype and
    Hugging Face layout (loadable by transformers 4 and 5 and mlx-lm: its config carries the rope both ways)."""
    from core.model_config import with_both_rope_forms

    shards = sorted(model.glob("*.safetensors"))
    if not shards:
        raise AdapterError(f"{model}: no *.safetensors weights to merge into.")
    remaining = set(adapter.a)
    index: dict[str, str] = {}
    for shard in shards:
        tensors, metadata = read_tensors(shard)
        if any(key.endswith(".scales") for key in tensors):
            raise AdapterError(f"{model} is quantized; merge into its unquantized original (--base-model).")
        for module in sorted(remaining):
            key = f"{module}.weight"
            if key not in tensors:
                continue
            base = tensors[key]
            delta = adapter.scale * (adapter.b[module].astype(np.float32) @ adapter.a[module].astype(np.float32))
            if delta.shape != base.array.shape:
                raise AdapterError(
                    f"'{key}' has shape {tuple(base.array.shape)} but the adapter's update has "
                    f"{tuple(delta.shape)}: the adapter belongs to another base model."
                )
            tensors[key] = from_float32(to_float32(base) + delta, base.dtype)
            remaining.discard(module)
        write_tensors(folder / shard.name, tensors, {**metadata, "format": "pt"})
        index.update({key: shard.name for key in tensors})
    if remaining:
        raise AdapterError(
            f"the base model has no weight for the adapter's module '{sorted(remaining)[0]}'; is "
            f"{model} the model the adapter was trained on?"
        )
    for name in MODEL_FILES:
        if (model / name).is_file():
            shutil.copyfile(model / name, folder / name)
    # Both forms of the rotary settings: transformers 5 writes only rope_parameters, which transformers 4 and
    # mlx-lm (llama, mistral, qwen2) do not read; they would silently use another rope base.
    config = json.loads((folder / "config.json").read_text())
    write_json(folder / "config.json", with_both_rope_forms(config))
    if len(shards) > 1:
        write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": index})
