"""NumPy safetensors I/O (bfloat16 included) agrees bit for bit with torch's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core.weights import StoredTensor, from_float32, read_tensors, to_float32, write_tensors


def test_bfloat16_rounding_equals_torch_ties_and_extremes_included() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.normal(0, 3, 100_000).astype(np.float32),
            # exact ties between two bfloat16 values: rounding to even decides them
            ((np.arange(1000, dtype=np.uint32) << 16) | 0x8000).view(np.float32),
            np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-40, np.finfo(np.float32).max], np.float32),
        ]
    )
    ours = from_float32(values, "BF16").array
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.isnan(to_float32(from_float32(np.array([np.nan], np.float32), "BF16"))).all()
    widened = to_float32(StoredTensor("BF16", theirs))
    assert np.array_equal(widened, torch.from_numpy(theirs.view(np.int16)).view(torch.bfloat16).float().numpy())


def test_files_read_and_write_like_safetensors_torch(tmp_path: Path) -> None:
    weights = {
        "a.weight": torch.randn(5, 3, dtype=torch.bfloat16),
        "b.weight": torch.randn(4, dtype=torch.float16),
        "c.bias": torch.randn(2, 2, 2),
        "d.ids": torch.arange(7, dtype=torch.int64),
    }
    save_file(weights, str(tmp_path / "torch.safetensors"), metadata={"format": "pt"})
    tensors, metadata = read_tensors(tmp_path / "torch.safetensors")
    assert metadata == {"format": "pt"} and {k: t.dtype for k, t in tensors.items()} == {
        "a.weight": "BF16",
        "b.weight": "F16",
        "c.bias": "F32",
        "d.ids": "I64",
    }
    write_tensors(tmp_path / "ours.safetensors", tensors, metadata)
    again = load_file(str(tmp_path / "ours.safetensors"))
    assert again.keys() == weights.keys()
    for name, tensor in weights.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name
