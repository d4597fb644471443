"""MLX computes the model transformers computes, whatever rotary settings the installed transformers saved.

transformers 5 writes the rope base and scaling under ``rope_parameters``; mlx-lm reads top-level keys for llama,
mistral and qwen2 and would silently use its own default base. Each model here is random-init, saved by the
installed transformers with a rope that differs from mlx-lm's default, and compared on per-sequence log-probs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import torch  # noqa: E402

from backends.mlx_backend.backend import MlxBackend  # noqa: E402
from core.adapters import Adapter  # noqa: E402
from core.export import write_merged  # noqa: E402
from core.model_config import config_warnings, mlx_overrides, with_both_rope_forms  # noqa: E402
from core.models_io import ModelError  # noqa: E402
from tests.helpers import DEMO_MODEL  # noqa: E402

VOCAB = 512  # the demo tokenizer's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# Llama 3's scaling with a short pre-training length, so that it changes the rotation of the 48 positions here.
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CASES = {
    "llama-base-100k": ("llama", {"rope_type": "default", "rope_theta": 100000.0}),
    "llama3-scaling": ("llama", {**LLAMA3, "rope_theta": 500000.0}),
    "linear-scaling": ("llama", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "yarn-scaling": (
        "llama",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0},
    ),
    "dynamic-scaling": ("llama", {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 100000.0}),
    "mistral-base-100k": ("mistral", {"rope_type": "default", "rope_theta": 100000.0}),
    "qwen2-base-500k": ("qwen2", {"rope_type": "default", "rope_theta": 500000.0}),
    "qwen3-base-100k": ("qwen3", {"rope_type": "default", "rope_theta": 100000.0}),
}


def save_model(folder: Path, kind: str, rope_parameters: dict[str, Any], seed: int = 0) -> Any:
    """A random-init model saved by the installed transformers, with the demo tokenizer. Weights are drawn
    wide (initializer_range 0.2) so that attention is sharp and a rotation error shows in the log-probs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        kind,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=False,
        rope_parameters=dict(rope_parameters),
    )
    model = AutoModelForCausalLM.from_config(config).float().eval()
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(DEMO_MODEL / name, folder / name)
    return model


def token_ids(rows: int = 2, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, VOCAB, (rows, width)).astype(np.int32)


def sequence_logps(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each row's summed log-probability of its tokens after the first."""
    logits = logits.astype(np.float64)[:, :-1]
    shifted = logits - logits.max(-1, keepdims=True)
    logps = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return np.take_along_axis(logps, ids[:, 1:, None].astype(np.int64), -1)[..., 0].sum(-1)


def torch_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


def mlx_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(ids)))


@pytest.mark.filterwarnings("ignore:.*sliding_window 4096 is ignored")  # mistral's; the 48 tokens here fit
@pytest.mark.parametrize("case", list(CASES))
def test_mlx_backend_matches_torch(case: str, tmp_path: Path) -> None:
    kind, rope_parameters = CASES[case]
    model = save_model(tmp_path, kind, rope_parameters)
    assert "rope_theta" not in json.loads((tmp_path / "config.json").read_text())  # transformers 5's form only
    backend = MlxBackend(dtype="float32")
    backend.load_model(str(tmp_path))
    ids = token_ids()
    expected = torch_logits(model, ids)
    got = mlx_logits(backend.model, ids)
    np.testing.assert_allclose(sequence_logps(got, ids), sequence_logps(expected, ids), rtol=1e-4)
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def test_merged_export_loads_the_same_model_in_plain_mlx_lm(tmp_path: Path) -> None:
    """The merged folder carries rope_theta/rope_scaling next to rope_parameters: plain mlx_lm.load (no Duet
    normalization) and transformers read the same model."""
    from mlx_lm import load
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    save_model(base, "llama", {**LLAMA3, "rope_theta": 100000.0})
    rng = np.random.default_rng(1)
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    shapes = {"q_proj": (64, 64), "v_proj": (32, 64)}
    a = {m: rng.normal(0, 0.3, (4, shapes[m[-6:]][1])).astype(np.float32) for m in modules}
    b = {m: rng.normal(0, 0.3, (shapes[m[-6:]][0], 4)).astype(np.float32) for m in modules}
    merged = tmp_path / "merged"
    merged.mkdir()
    write_merged(merged, base, Adapter(a, b, rank=4, scale=2.0))
    config = json.loads((merged / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    ids = token_ids(seed=2)
    expected = torch_logits(AutoModelForCausalLM.from_pretrained(merged).float().eval(), ids)
    model, _ = load(str(merged))
    got = mlx_logits(model, ids)
    np.testing.assert_allclose(sequence_logps(got, ids), sequence_logps(expected, ids), rtol=1e-4)
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def test_transformers_reads_both_forms_as_one() -> None:
    """Written both ways, the config means the same rope to transformers 5 as rope_parameters alone."""
    from transformers import LlamaConfig

    config = LlamaConfig(rope_parameters={**LLAMA3, "rope_theta": 500000.0}, max_position_embeddings=256)
    both = with_both_rope_forms(config.to_dict())
    assert both["rope_scaling"] == LLAMA3 and both["rope_theta"] == 500000.0
    assert LlamaConfig.from_dict(both).rope_parameters == config.rope_parameters
    plain = with_both_rope_forms(LlamaConfig(rope_theta=100000.0).to_dict())
    assert plain["rope_theta"] == 100000.0 and plain["rope_scaling"] is None


def test_an_unmappable_rope_type_is_refused_with_the_file_and_key() -> None:
    config = {
        "model_type": "llama",
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0],
            "long_factor": [1.0],
        },
    }
    with pytest.raises(ModelError, match=r"m/config\.json: rope_parameters\.rope_type 'longrope'"):
        mlx_overrides(config, "m/config.json")


def test_ignored_keys_are_warned_about(tmp_path: Path) -> None:
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "attention_factor": 1.5}
    config = {"model_type": "mistral", "sliding_window": 4096, "rope_parameters": rope}
    (tmp_path / "config.json").write_text(json.dumps(config))
    notes = config_warnings(tmp_path)
    assert any("rope_parameters.attention_factor" in note for note in notes)
    assert any("sliding_window 4096" in note for note in notes)
    assert all(str(tmp_path / "config.json") in note for note in notes)
    # a plain transformers 5 llama config: nothing to say, and the base moves to where mlx-lm reads it
    plain = {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
    assert mlx_overrides(plain, "c") == ({"rope_theta": 100000.0, "rope_scaling": None}, [])


def test_doctor_names_what_mlx_ignores(tmp_path: Path) -> None:
    from rich.console import Console

    from app.doctor import doctor

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0], "long_factor": [1.0]}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_parameters": rope}))
    console = Console(record=True, width=400)
    assert doctor(console, model=str(tmp_path)) == 0
    text = console.export_text()
    assert "warning: " in text and "rope_parameters.rope_type 'longrope'" in text
    console = Console(record=True, width=400)
    doctor(console, model=str(DEMO_MODEL))
    assert "MLX reads its config as transformers does" in console.export_text()
