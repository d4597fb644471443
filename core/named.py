"""Names that stand for a model or a data set (``demo``), provided by the application.

The library resolves ``model.path: demo`` and ``data.train: demo`` without knowing where the demo lives: the
application layer registers what each name means (``app`` registers the built-in demo from ``models``), so
the library never imports upward.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

NAMED_MODELS: dict[str, Callable[[], Path]] = {}  # name → a function giving the model folder (built on first use)
NAMED_DATA: dict[str, Callable[[], Path]] = {}  # name → a function giving the preference file


def register_model(name: str, folder: Callable[[], Path]) -> None:
    NAMED_MODELS[name] = folder


def register_data(name: str, file: Callable[[], Path]) -> None:
    NAMED_DATA[name] = file
