"""The named workloads: a model shape, a tokenizer, data, batch size and sequence length."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
# the shared fixtures beside the checkout; $DUET_FIXTURES elsewhere (a GPU machine gets a carried copy)
FIXTURES = Path(os.environ.get("DUET_FIXTURES") or ROOT.parent / "shared" / "fixtures")
QWEN = FIXTURES / "tokenizers" / "qwen2.5-0.5b-instruct"
LLAMAFACTORY = FIXTURES / "data" / "llamafactory_dpo_en_demo.json"


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    tokenizer: Path  # a folder with tokenizer files (and config.json for random-init shapes)
    data: Path
    pairs: int  # the first N pairs of the data
    batch_pairs: int
    max_length: int
    max_prompt_length: int | None
    model_overrides: dict  # changes to the tokenizer folder's config.json, for a random-init model of that shape
    lora_rank: int = 16
    lora_alpha: float = 32.0
    beta: float = 0.1
    lr: float = 5e-5
    model: Path | str | None = None  # a model folder or registry name to use as it is, not a random-init shape


WORKLOADS = {
    "demo": Workload(
        "demo",
        "the demo: tiny-chat (0.7M parameters, vocabulary 512), its preference data; LoRA r16 on all "
        "projections; 8 pairs, max length 128",
        DEMO / "tiny-chat",
        DEMO / "preferences.jsonl",
        64,
        8,
        128,
        64,
        {},
        lr=1e-3,
        model=DEMO / "tiny-chat",
    ),
    "qwen-small": Workload(
        "qwen-small",
        "random-init, Qwen2.5 tokenizer and vocabulary (151,936), hidden 256, 4 layers, 4 heads / 2 KV "
        "heads, intermediate 704, tied embeddings, fp32; LoRA r16 on all projections; 4 pairs, max length 512",
        QWEN,
        LLAMAFACTORY,
        64,
        4,
        512,
        None,
        {
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 704,
            "tie_word_embeddings": True,
        },
    ),
    "qwen0.5b-shape": Workload(
        "qwen0.5b-shape",
        "random-init with the real Qwen2.5-0.5B shape (config.json of the fixture) and tokenizer; "
        "LoRA r16 on all projections; 4 pairs, max length 512",
        QWEN,
        LLAMAFACTORY,
        64,
        4,
        512,
        None,
        {},
    ),
    "qwen0.5b-long": Workload(
        "qwen0.5b-long",
        "the real Qwen2.5-0.5B shape, 2 pairs, max length 1024 (memory)",
        QWEN,
        LLAMAFACTORY,
        64,
        2,
        1024,
        None,
        {},
    ),
    "smollm2-135m": Workload(
        "smollm2-135m",
        "the real SmolLM2-135M-Instruct (the registry's smollm2-135m-instruct: its 4-bit GGUF dequantized to "
        "fp32), LLaMA-Factory pairs; LoRA r16 on all projections; 2 pairs, max length 512",
        QWEN,  # unused: the model folder has its own tokenizer
        LLAMAFACTORY,
        8,
        2,
        512,
        None,
        {},
        lr=5e-5,
        model="smollm2-135m-instruct",
    ),
    "qwen0.5b-gpu": Workload(
        "qwen0.5b-gpu",
        "the real Qwen2.5-0.5B shape (random init), 8 pairs, max length 1024: the GPU comparison",
        QWEN,
        LLAMAFACTORY,
        64,
        8,
        1024,
        None,
        {},
    ),
}
