"""Loading tokenizers (and resolving model locations) with errors a user can act on."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import DuetError
from core.named import MODEL_FILE_CONVERTERS, NAMED_MODELS


class ModelError(DuetError):
    """A model or tokenizer that cannot be found or loaded."""


def resolve_model_path(path: str, emit: Callable | None = None) -> str:
    """A local folder as an absolute path; a named model (``demo``, a recommended model) or a model file
    (``.gguf``) as the folder it stands for, converted on first use (``emit`` receives the conversion's
    progress events); anything else is taken for a hub id."""
    local = Path(NAMED_MODELS[path]()) if path in NAMED_MODELS else Path(path).expanduser()
    if local.is_file():
        return str(_converted(local, path, emit))
    if local.is_dir():
        models = sorted(local.glob("*.gguf")) if not (local / "config.json").exists() else []
        if len(models) > 1:
            names = ", ".join(m.name for m in models)
            raise ModelError(f"model {path}: this folder holds several GGUF files ({names}); name one in model.path.")
        return str(_converted(models[0], path, emit)) if models else str(local.resolve())
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or path.lower().endswith(".gguf"):
        raise ModelError(f"model {path}: no such {'file' if path.lower().endswith('.gguf') else 'folder'}.")
    check_hub(path)
    return path  # a hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct


def _converted(file: Path, path: str, emit: Callable | None) -> Path:
    convert = MODEL_FILE_CONVERTERS.get(file.suffix.lower())
    if convert is None:
        known = ", ".join(sorted(MODEL_FILE_CONVERTERS)) or "none"
        raise ModelError(
            f"model {path}: is a file; give the folder holding config.json and the weights, or a model file "
            f"Duet converts ({known})."
        )
    return convert(file.resolve(), emit)


HUB_TIMEOUT = 3.0  # seconds the hub gets to answer before it counts as unreachable


def check_hub(repo_id: str) -> None:
    """Fail at once, not after minutes of retries, when the hub cannot be reached and ``repo_id`` is not in
    the local HF cache. A cached model is used offline: huggingface_hub is switched to offline mode so that
    transformers reads the cache without trying the network first."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and hub_reachable(constants.ENDPOINT):
        return
    offline = constants.HF_HUB_OFFLINE
    if is_cached(repo_id):
        constants.HF_HUB_OFFLINE = True  # huggingface_hub and transformers read this flag on every call
        return
    why = "HF_HUB_OFFLINE is set" if offline else f"no answer from {constants.ENDPOINT} within {HUB_TIMEOUT:g} s"
    raise ModelError(
        f"model {repo_id}: the Hugging Face hub cannot be reached ({why}) and this model is not in the local "
        "HF cache. Pass a local model folder (model.path=/path/to/model), or "
        f"{'unset HF_HUB_OFFLINE' if offline else 'connect to the network'} so it can be downloaded."
    )


_REACHED: set[str] = set()  # endpoints that answered once (a failure is asked again: the network may come back)


def hub_reachable(endpoint: str, timeout: float = HUB_TIMEOUT) -> bool:
    """Whether ``endpoint`` answers an HTTP request within ``timeout`` seconds (through any configured proxy).

    Asked in a thread: a name lookup that hangs is not bounded by the request's own timeout."""
    from huggingface_hub.utils import get_session

    if endpoint in _REACHED:
        return True

    done, answered = threading.Event(), []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=timeout)
            answered.append(True)
        except Exception:  # any failure to connect (DNS, refused, TLS, timeout) means unreachable
            pass
        finally:
            done.set()

    threading.Thread(target=probe, daemon=True).start()
    done.wait(timeout)
    if answered:
        _REACHED.add(endpoint)
    return bool(answered)


def is_cached(repo_id: str) -> bool:
    """Whether the HF cache holds this model (its config or tokenizer config at the main revision)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(
            isinstance(try_to_load_from_cache(repo_id, name), str) for name in ("config.json", "tokenizer_config.json")
        )
    except ValueError:  # not a valid repo id
        return False


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
