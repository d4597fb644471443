"""Loading tokenizers (and resolving model locations) with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import DuetError


class ModelError(DuetError):
    """A model or tokenizer that cannot be found or loaded."""


def resolve_model_path(path: str) -> str:
    """A local folder as an absolute path; anything else is taken for a hub id."""
    if path == "demo":
        from models.tiny_chat import ensure_demo_model

        return str(ensure_demo_model())
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelError(f"model {path}: is a file; give the folder holding config.json and the weights.")
        return str(local.resolve())
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ModelError(f"model {path}: no such folder.")
    return path  # a hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_folder(location: str, name: str) -> None:
    """A local model folder must hold a config and safetensors weights: pickled weights are refused, since
    unpickling a file can run any code in it."""
    folder = Path(location)
    if not folder.is_dir():
        return  # a hub id: transformers fetches safetensors only (use_safetensors=True)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"model {name}: no config.json in {folder}; give the folder a model was saved to "
            "(save_pretrained), or a hub id."
        )
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelError(
            f"model {name}: its weights are pickle files ({', '.join(pickled)}); Duet loads safetensors "
            "only, because unpickling can run code. Convert them, where you trust their source, with "
            "transformers (from_pretrained, then save_pretrained(..., safe_serialization=True))."
        )
    raise ModelError(f"model {name}: no weights in {folder} (expected *.safetensors).")


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    location = resolve_model_path(path)
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        where = "folder" if Path(location).is_dir() else "hub id"
        raise ModelError(
            f"model {path}: no tokenizer could be loaded from this {where} ({str(exc).splitlines()[0]}). "
            "A model folder needs tokenizer.json or vocab files and tokenizer_config.json; a hub id needs "
            "the network (or a filled HF cache)."
        ) from None
