"""The demo's model and data are reproducible by their recipe (models/tiny_chat.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.tiny_chat import DATA_FILE, MODEL_DIR, build_model, concise_reply, is_concise, preference_rows


def test_the_committed_preference_data_is_what_the_recipe_writes() -> None:
    rows = [json.loads(line) for line in DATA_FILE.read_text().splitlines()]
    assert rows == preference_rows()
    assert all(is_concise(r["chosen"]) and not is_concise(r["rejected"]) for r in rows)
    assert len({r["prompt"] for r in rows}) == 64  # 8 phrasings × 8 categories, with 16 items each


def test_the_committed_model_is_small_and_loads_with_transformers() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert size < 20 * 1024 * 1024
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert model.config.model_type == "llama" and tokenizer.eos_token == "<|im_end|>"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


@pytest.mark.slow
def test_the_recipe_builds_a_model_that_learns(tmp_path: Path) -> None:
    """A short build (the committed model had 500 steps): loss falls, and the result loads and talks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.tokenization import ChatTokenizer

    lines: list[str] = []
    out = build_model(tmp_path / "tiny", steps=60, batch_size=16, log=lines.append)
    losses = [float(line.rsplit(" ", 1)[1]) for line in lines if "per-token NLL" in line]
    assert losses[-1] < 0.5 * losses[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(out))
    prompt = torch.tensor([chat.prompt_ids([{"role": "user", "content": "Name a fruit."}])])
    reply = model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=chat.stop_ids)
    assert chat.decode(reply[0, prompt.shape[1] :].tolist())
    assert concise_reply("otter") == "Otter."
