"""Names that stand for a model or a data set (``demo``, the recommended models), and model files that are
converted before use (``.gguf``), provided by the application.

The library resolves ``model.path: demo`` and ``data.train: demo`` without knowing where the demo lives: the
application layer registers what each name means (``app`` registers the registry of ``models``), so the
library never imports upward. Likewise a converter registered for a file suffix turns such a file into a
model folder (GGUF needs torch to dequantize, which the library never imports).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

NAMED_MODELS: dict[str, Callable[[], Path]] = {}  # name → a function giving the model folder (built on first use)
NAMED_DATA: dict[str, Callable[[], Path]] = {}  # name → a function giving the preference file
# file suffix → a function (file, emit or None) giving a model folder converted from it (cached by the converter)
MODEL_FILE_CONVERTERS: dict[str, Callable[[Path, Callable | None], Path]] = {}


def register_model(name: str, folder: Callable[[], Path]) -> None:
    NAMED_MODELS[name] = folder


def register_data(name: str, file: Callable[[], Path]) -> None:
    NAMED_DATA[name] = file


def register_model_file(suffix: str, convert: Callable[[Path, Callable | None], Path]) -> None:
    MODEL_FILE_CONVERTERS[suffix.lower()] = convert
