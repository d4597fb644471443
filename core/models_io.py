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
