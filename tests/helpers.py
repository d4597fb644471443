"""Small builders shared by the tests: tiny random models, demo-data subsets, quick run configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.config import Config, config_from_dict
from models.tiny_chat import MODEL_DIR, preference_rows

DEMO_MODEL = MODEL_DIR


def write_demo_subset(path: Path, count: int = 64, seed: int = 0) -> Path:
    rows = preference_rows(seed=seed, count=count)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def quick_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A fast run of the demo model on 64 demo pairs, everything written under ``tmp_path``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data_file = tmp_path / "prefs.jsonl"
    if not data_file.exists():
        write_demo_subset(data_file)
    base: dict[str, dict[str, Any]] = {
        "model": {"path": str(DEMO_MODEL), "backend": "torch", "device": "cpu"},
        "data": {"train": str(data_file), "eval_fraction": 0.125, "max_length": 128, "max_prompt_length": 64},
        "lora": {"rank": 4, "alpha": 8},
        "objective": {"name": "dpo"},
        "train": {
            "batch_size": 4,
            "max_steps": 6,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "output_dir": str(tmp_path / "runs"),
            "cache_dir": str(tmp_path / "cache"),
            "log_every": 1,
        },
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return config_from_dict(base).validate()


def tiny_causal_lm(kind: str = "llama", *, vocab: int = 97, tie: bool = True, seed: int = 0, **extra: Any):
    """A random-init decoder of a given architecture, small enough to run anywhere in milliseconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        kind,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        **extra,
    )
    config._attn_implementation = "eager" if kind.startswith("gemma") else "sdpa"
    model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def random_batch(vocab: int, rows: int = 4, width: int = 24, seed: int = 0):
    """A Batch-like set of arrays with varied prompt and reply lengths and right padding."""
    import numpy as np

    from core.batching import collate
    from core.tokenization import TokenizedPair

    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(rows // 2):
        prompt = rng.integers(1, vocab, rng.integers(3, 9)).astype(np.int32)
        chosen = rng.integers(1, vocab, rng.integers(1, width - 9)).astype(np.int32)
        rejected = rng.integers(1, vocab, rng.integers(1, width - 9)).astype(np.int32)
        pairs.append(TokenizedPair(index, prompt, chosen, rejected))
    return collate(pairs, pad_id=0)


def float64_throughout(model) -> None:
    """Make every computation of a float64 Llama/Qwen2-style model float64. transformers computes rotary cos/sin
    and RMSNorm (forward and backward) in float32 whatever the model's dtype, and a vectorized float32 kernel
    rounds the same value differently depending on where it falls in the array: two layouts of the same tokens
    would then differ by float32 rounding even in a float64 model, hiding what a float64 exactness check is
    for. Default (unscaled) RoPE only."""
    import types

    import torch

    def rotary(self, x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(x.device, torch.float64)
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)

    def rms_norm(self, hidden):
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))

    patched = {"RotaryEmbedding": 0, "RMSNorm": 0}
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RotaryEmbedding"):
            assert getattr(module, "rope_type", "default") == "default", "default RoPE only"
            module.forward = types.MethodType(rotary, module)
            patched["RotaryEmbedding"] += 1
        elif name.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm, module)
            patched["RMSNorm"] += 1
    assert all(patched.values()), f"not a Llama/Qwen2-style model: {patched}"


def metric_bounds(key: str, rtol: float, beta: float, logps, per_token: int = 1) -> dict[str, float]:
    """pytest.approx's bounds for one objective metric computed from float32 log-probs known to ``rtol``.

    Log-prob means (and the NLL) are relative quantities: ``rtol``. Rewards, margins and the loss are β times
    differences of summed log-probs (per token for dpo_norm and ipo: ``per_token`` is then the shortest reply):
    float32 rounding of sums near, say, -1000 is of order 1e-4 of 1000, whatever the size of the difference, so
    their error is bounded by β × rtol × twice the largest |log-prob| involved, not by rtol of the metric itself.
    """
    import numpy as np

    if key.startswith("logps/") or key == "nll_loss":
        return {"rel": rtol, "abs": 0.0}
    return {"rel": rtol, "abs": rtol * beta * 2 * float(np.abs(logps).max()) / per_token}
