"""Padding-free batches (``model.padding_free``): each row run through the decoder at its own length gives the
log-probs, metrics and gradients of the padded batch, exactly in float64 (1e-9 relative) and within float32
rounding (test_shared_prompts.py derives the bound), with and without shared prompts; a row's result no
longer depends on what it was batched with; and ``auto`` takes the row-by-row path only where it pays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.torch_backend.backend import TorchBackend, unpadding_pays
from core.batching import collate
from core.config import LoraConfig, config_from_dict
from core.data import load_preferences
from core.objectives import DPO
from core.tokenization import ChatTokenizer, tokenize_pairs
from tests.helpers import float64_throughout, metric_bounds, tiny_causal_lm
from tests.test_shared_prompts import FP32_RTOL, FP64_RTOL, seeded_lora


@pytest.fixture(scope="module")
def uneven_pairs(fixture_data, qwen_tokenizer):
    """Real pairs of very different lengths (a short one beside long multi-turn ones): most of a padded
    batch would be padding."""
    pairs, _ = load_preferences(fixture_data / "llamafactory_dpo_en_demo.json")
    tokenized, _ = tokenize_pairs(pairs[:12], ChatTokenizer(qwen_tokenizer), max_length=512, max_prompt_length=256)
    by_length = sorted(tokenized, key=lambda p: p.length)
    chosen = [by_length[0], by_length[-1], by_length[len(by_length) // 2]]
    batch = collate(chosen, pad_id=0)
    assert batch.attention_mask.sum() < 0.75 * batch.attention_mask.size  # a quarter or more is padding
    return chosen


def tiny_backend(qwen_tokenizer, dtype: str, *, share: bool, padding_free: bool | str) -> TorchBackend:
    model = tiny_causal_lm("qwen2", vocab=len(qwen_tokenizer), tie=True, seed=7)
    model = model.to(getattr(torch, dtype))
    if dtype == "float64":
        float64_throughout(model)
    backend = TorchBackend(device="cpu", dtype=dtype, share_prompts=share, padding_free=padding_free)
    backend.use_model(model, qwen_tokenizer, "tiny")
    backend.attach_lora(LoraConfig(rank=4, alpha=8))
    seeded_lora(backend)
    return backend


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize(("dtype", "rtol"), [("float32", FP32_RTOL), ("float64", FP64_RTOL)])
def test_row_by_row_equals_the_padded_batch(uneven_pairs, qwen_tokenizer, share: bool, dtype: str, rtol: float):
    unpadded, padded = (tiny_backend(qwen_tokenizer, dtype, share=share, padding_free=f) for f in (True, False))
    batch = collate(uneven_pairs, pad_id=0)
    for adapter in (True, False):
        np.testing.assert_allclose(
            unpadded.sequence_logps(batch, adapter=adapter), padded.sequence_logps(batch, adapter=adapter), rtol=rtol
        )
    reference = padded.sequence_logps(batch, adapter=False)
    logps = np.concatenate([reference, padded.sequence_logps(batch, adapter=True)])
    objective = DPO(0.1)
    results = [b.forward_backward(batch, objective, reference, 0.5, 1.0) for b in (unpadded, padded)]
    for key, value in results[1].metrics.items():
        if key == "rewards/accuracies":
            assert results[0].metrics[key] == value, key
            continue
        assert results[0].metrics[key] == pytest.approx(value, **metric_bounds(key, rtol, objective.beta, logps)), key
    grads = [{n: p.grad for n, p in b.model.named_parameters() if p.requires_grad} for b in (unpadded, padded)]
    assert grads[1]
    for name, expected in grads[1].items():
        expected = expected.numpy()
        np.testing.assert_allclose(
            grads[0][name].numpy(), expected, rtol=rtol, atol=rtol * np.abs(expected).max(), err_msg=name
        )


@pytest.mark.parametrize("share", [True, False])
def test_a_rows_log_prob_does_not_depend_on_its_batch(uneven_pairs, qwen_tokenizer, share: bool):
    """float32: a pair alone and the same pair beside longer ones give the same bits row by row, so a reference
    pass that batches pairs unlike the steps leaves a zero adapter exactly at its reference (a first loss of
    exactly log 2). A padded batch need not: on SmolLM2 its reference pass left the first loss at 0.6931487
    (docs/benchmarks.md); this tiny model's products happen to be batch-invariant either way."""
    backend = tiny_backend(qwen_tokenizer, "float32", share=share, padding_free=True)
    short = uneven_pairs[0]
    alone = backend.sequence_logps(collate([short], pad_id=0), adapter=False)
    batched = backend.sequence_logps(collate(uneven_pairs, pad_id=0), adapter=False)
    assert alone[0] == batched[0] and alone[1] == batched[len(uneven_pairs)]


def test_when_auto_runs_row_by_row() -> None:
    # padding a tenth or more, rows of 128 tokens or more on average: row by row
    assert unpadding_pays(np.array([600, 300]), 600)
    assert unpadding_pays(np.array([512, 400]), 512)  # 11% padding
    assert not unpadding_pays(np.array([512, 460]), 512)  # 5%: under a tenth
    assert not unpadding_pays(np.array([40, 10]), 40)  # short rows: the extra passes cost more
    assert not unpadding_pays(np.array([300]), 600)  # one row: nothing to unpad against
    # shared-prompt rows whose attention splits: row by row for that alone, if long enough
    assert unpadding_pays(np.array([600, 600]), 600, split_attention=True)
    assert unpadding_pays(np.array([600]), 600, split_attention=True)
    assert not unpadding_pays(np.array([60, 60]), 60, split_attention=True)


def test_auto_unpads_on_a_cpu_only_where_it_pays(uneven_pairs, qwen_tokenizer, monkeypatch) -> None:
    backend = tiny_backend(qwen_tokenizer, "float32", share=False, padding_free="auto")
    seen: list[object] = []
    forward = backend._logps_module.forward

    def spy(inputs, count, row_lengths=None, row_parts=None):
        seen.append((row_lengths, row_parts))
        return forward(inputs, count, row_lengths, row_parts)

    monkeypatch.setattr(backend._logps_module, "forward", spy)
    backend.sequence_logps(collate(uneven_pairs, pad_id=0))
    even = [uneven_pairs[1], uneven_pairs[1]]
    backend.sequence_logps(collate(even, pad_id=0))
    assert seen[0] == ([int(n) for n in collate(uneven_pairs, pad_id=0).attention_mask.sum(axis=1)], None)
    assert seen[1] == (None, None)  # equal rows: no padding to skip
    backend.share_prompts = True  # shared rows split their attention: row by row even without padding
    backend.sequence_logps(collate(even, pad_id=0))
    pair = uneven_pairs[1]
    parts = (len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids))
    assert seen[2] == ([sum(parts)] * 2, [parts] * 2)


def test_the_setting() -> None:
    assert config_from_dict({}).model.padding_free == "auto"
    assert config_from_dict({"model": {"padding_free": False}}).model.padding_free is False


def test_auto_sharing_does_not_depend_on_the_batch(fixture_data, qwen_tokenizer):
    """share_prompts auto weighs a batch's padded tokens, so alone and in a batch a pair could be laid out
    differently (and round differently). Where shared rows run one by one (a CPU, long rows), every pair
    shares: the same bits alone and batched."""
    from backends.torch_backend.backend import kernel_inputs

    pairs, _ = load_preferences(fixture_data / "llamafactory_dpo_en_demo.json")
    tokenized, _ = tokenize_pairs(pairs[:12], ChatTokenizer(qwen_tokenizer), max_length=512, max_prompt_length=256)
    # a pair the batch-level rule would not share alone, beside one that is mostly prompt and makes it share
    lonely = next(p for p in tokenized if not kernel_inputs(collate([p], pad_id=0), "auto")[2])
    partner = max(tokenized, key=lambda p: len(p.prompt_ids) / (len(p.chosen_ids) + len(p.rejected_ids)))
    batch = collate([lonely, partner], pad_id=0)
    assert kernel_inputs(batch, "auto")[2]
    backend = tiny_backend(qwen_tokenizer, "float32", share="auto", padding_free="auto")
    layouts: list[object] = []
    forward = backend._logps_module.forward

    def spy(inputs, count, row_lengths=None, row_parts=None):
        layouts.append(row_parts[0] if row_parts else None)
        return forward(inputs, count, row_lengths, row_parts)

    backend._logps_module.forward = spy
    alone = backend.sequence_logps(collate([lonely], pad_id=0))
    batched = backend.sequence_logps(batch)
    parts = (len(lonely.prompt_ids), len(lonely.chosen_ids), len(lonely.rejected_ids))
    assert layouts == [parts, parts]  # one shared row, alone and batched
    # (this tiny model's products round alike in both layouts; SmolLM2's did not: a first margin of -1.2e-5)
    assert alone[0] == batched[0] and alone[1] == batched[2]
