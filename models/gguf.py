"""GGUF in: a ``.gguf`` model file converted once into a safetensors folder that both backends train on.

transformers reads a GGUF file (with the ``gguf`` package), dequantizing every tensor to float32 and
rebuilding the tokenizer and chat template from the file's metadata. The conversion is written atomically
into the cache under the file's sha256, so a second run (or a second process) finds it at once. A quantized
file (Q4_1, Q8_0...) trains as its dequantized weights: LoRA adapts exactly the model the file holds, and
an export merges into those float32 weights.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path

from core.atomic import atomic_directory, write_json
from core.events import Event, Info
from core.fingerprint import cache_root, file_digest
from core.model_config import with_both_rope_forms
from core.models_io import ModelError
from core.progress import PhaseProgress

FORMAT_VERSION = 1  # bump when the conversion's output changes: older folders are then rebuilt
SOURCE_FILE = "gguf_source.json"  # in a converted folder: where it came from, and the quantization it had
UNQUANTIZED = {"F32", "F16", "BF16", "F64"}
_DIGESTS: dict[str, str] = {}  # one hash of a file per process, however often its path is resolved


def gguf_metadata(path: Path) -> dict[str, object]:
    """The file's architecture, name and the tensor types it stores (quantized ones named), from its header."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ModelError(f"model {path}: not a readable GGUF file ({exc}).") from None
    fields = {
        name: reader.fields[name].contents()
        for name in ("general.architecture", "general.name")
        if name in reader.fields
    }
    types = sorted({tensor.tensor_type.name for tensor in reader.tensors})
    return {
        "architecture": fields.get("general.architecture"),
        "name": fields.get("general.name"),
        "tensor_types": types,
        "quantized": [t for t in types if t not in UNQUANTIZED],
        "tensors": len(reader.tensors),
    }


def check_supported(path: Path, architecture: object) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"model {path}: a GGUF file of the '{architecture}' architecture, which transformers cannot read "
            f"from GGUF (it reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}). Use the model's "
            "safetensors folder instead."
        )


def converted_folder(path: Path, emit: Callable[[Event], None] | None = None) -> Path:
    """The safetensors folder converted from the GGUF file ``path``, built on first use."""
    digest = file_digest(path, _DIGESTS)  # hashed once per process (keyed by path, size and mtime)
    folder = cache_root() / "models" / f"{path.stem}-{digest[:16]}-v{FORMAT_VERSION}"
    if (folder / SOURCE_FILE).is_file():
        return folder
    metadata = gguf_metadata(path)
    check_supported(path, metadata["architecture"])
    if emit is not None:
        emit(Info(message=f"converting {path.name} into a safetensors folder, once: {folder}"))
    with atomic_directory(folder, replace=True) as temporary:
        _convert(path, temporary, emit)
        write_json(temporary / SOURCE_FILE, {"gguf": str(path), "sha256": digest, **metadata})
    return folder


def _convert(path: Path, out: Path, emit: Callable[[Event], None] | None) -> None:
    from transformers.utils import logging as transformers_logging

    # four steps, reported as each begins: reading the tokenizer from the file's metadata takes as long as
    # dequantizing the weights (transformers' own per-tensor bar would sit at 0 meanwhile)
    progress = PhaseProgress(emit or (lambda event: None), "convert", f"converting {path.name}", 4, unit="steps")
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        _convert_steps(path, out, progress)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def _convert_steps(path: Path, out: Path, progress: PhaseProgress) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(0)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    progress(1)
    with contextlib.redirect_stderr(io.StringIO()):  # its per-tensor tqdm bar: this phase has its own
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    progress(2)
    # a model loaded from GGUF refuses save_pretrained (it counts as quantized); the same weights in a model
    # built from its config save normally
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    progress(3)
    loaded.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    settings = json.loads((out / "config.json").read_text())
    settings.pop("quantization_config", None)
    write_json(out / "config.json", with_both_rope_forms(settings))
    progress(4)


def quantization_note(folder: str | Path) -> str | None:
    """For a folder converted from a quantized GGUF: a note that it trains as its dequantized weights."""
    source = Path(folder) / SOURCE_FILE
    if not source.is_file():
        return None
    info = json.loads(source.read_text())
    if not info.get("quantized"):
        return None
    return (
        f"the model was converted from {Path(info['gguf']).name}, quantized ({', '.join(info['quantized'])}): "
        "it trains as its dequantized float32 weights, so its quality is that of the quantized file"
    )


# -- GGUF out ------------------------------------------------------------------------------------------------

GGUF_EXPORT_ARCHITECTURES = ("llama",)  # tensor naming and the Q/K row order below are llama.cpp's for these
_LLAMA_NAMES = (
    ("model.embed_tokens.", "token_embd."),
    ("model.norm.", "output_norm."),
    ("lm_head.", "output."),
    ("self_attn.q_proj.", "attn_q."),
    ("self_attn.k_proj.", "attn_k."),
    ("self_attn.v_proj.", "attn_v."),
    ("self_attn.o_proj.", "attn_output."),
    ("mlp.gate_proj.", "ffn_gate."),
    ("mlp.up_proj.", "ffn_up."),
    ("mlp.down_proj.", "ffn_down."),
    ("input_layernorm.", "attn_norm."),
    ("post_attention_layernorm.", "ffn_norm."),
    ("model.layers.", "blk."),
)
SKIPPED_FIELDS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def gguf_source(model_folder: str | Path) -> Path:
    """The GGUF file a converted model folder came from; a clear error for any other folder."""
    source = Path(model_folder) / SOURCE_FILE
    if not source.is_file():
        raise ModelError(
            f"--to gguf: the base model {model_folder} was not converted from a GGUF file, so Duet has no GGUF "
            "tokenizer metadata to write. Export --to merged and convert that folder with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    info = json.loads(source.read_text())
    if info.get("architecture") not in GGUF_EXPORT_ARCHITECTURES:
        raise ModelError(
            f"--to gguf: the base model is of the '{info.get('architecture')}' architecture; GGUF export supports "
            f"{', '.join(GGUF_EXPORT_ARCHITECTURES)}. Export --to merged and use llama.cpp's convert_hf_to_gguf.py."
        )
    file = Path(info["gguf"])
    if not file.is_file():
        raise ModelError(f"--to gguf: {file}, the GGUF file the base model was converted from, is gone.")
    return file


def gguf_name(name: str) -> str:
    for hf, gguf in _LLAMA_NAMES:
        name = name.replace(hf, gguf)
    return name


def llama_cpp_rows(weight, heads: int):
    """llama.cpp keeps each attention head's rotary halves interleaved: the Q/K rows in its order (the
    inverse of what transformers undoes when it reads a GGUF file)."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).swapaxes(1, 2).reshape(rows, columns)


def write_gguf(merged: Path, source: Path, out: Path, emit: Callable[[Event], None] | None = None) -> None:
    """A float32 GGUF file of the merged model folder ``merged``, with every metadata field of ``source`` (the
    GGUF it was converted from: tokenizer, chat template, hyperparameters) but its quantization."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

    from core.weights import read_tensors, to_float32

    reader = GGUFReader(source)
    config = json.loads((merged / "config.json").read_text())
    tensors: dict[str, object] = {}
    for shard in sorted(merged.glob("*.safetensors")):
        stored, _ = read_tensors(shard)
        tensors.update({name: to_float32(t) for name, t in stored.items()})
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    writer = GGUFWriter(str(out), "llama")
    for field in reader.fields.values():
        if field.name.startswith(SKIPPED_FIELDS):
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type(LlamaFileType.ALL_F32)
    progress = PhaseProgress(
        emit or (lambda event: None), "export", f"writing {out.name}", len(tensors), unit="tensors"
    )
    for number, (name, weight) in enumerate(sorted(tensors.items())):
        if name.endswith("self_attn.q_proj.weight"):
            weight = llama_cpp_rows(weight, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weight = llama_cpp_rows(weight, kv_heads)
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(weight, dtype=np.float32))
        progress(number + 1, len(tensors))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
