"""Shared prompts: each pair's prompt computed once gives the same log-probs, metrics and gradients as the plain
layout, on the demo and on long multi-turn data: exactly (1e-9 relative) in float64, and within float32 rounding
(bounds derived below) in float32."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.torch_backend.backend import TorchBackend, kernel_inputs
from core.batching import SharedPromptBatch, collate, share_prompts
from core.config import LoraConfig
from core.data import load_preferences
from core.objectives import DPO
from core.tokenization import ChatTokenizer, TokenizedPair, tokenize_pairs
from tests.helpers import DEMO_MODEL, float64_throughout, metric_bounds, tiny_causal_lm, write_demo_subset


def test_the_packing_layout() -> None:
    pair = TokenizedPair(
        0, np.array([10, 11, 12], np.int32), np.array([20, 21], np.int32), np.array([30, 31, 32, 33], np.int32)
    )
    packed = share_prompts(collate([pair], pad_id=0), pad_id=0)
    assert packed.input_ids[0].tolist() == [10, 11, 12, 20, 21, 30, 31, 32, 33]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]  # rejected restarts after the prompt
    assert packed.segments[0].tolist() == [1, 1, 1, 2, 2, 3, 3, 3, 3]
    # the first token of each reply is predicted from the prompt's last position
    assert packed.positions.tolist() == [2, 3, 2, 5, 6, 7]
    assert packed.targets.tolist() == [20, 21, 30, 31, 32, 33]
    assert packed.outputs.tolist() == [0, 0, 1, 1, 1, 1]
    assert SharedPromptBatch.REJECTED == 3


# float32: the two layouts sum the same terms in another order (and attend over other shapes), so each log-prob
# carries rounding of order ε₃₂ × its magnitude × the terms summed: 1e-4 relative bounds it with room on every
# CPU seen so far. A reward is β × a difference of such log-probs, so its error is bounded by β × 1e-4 × the
# log-probs' magnitude, not by 1e-4 of the (much smaller) reward itself (``metric_bounds``): comparing rewards
# relatively would check rounding of sums near -1000, not the packing (it failed so on an AMD EPYC CPU).
FP32_RTOL = 1e-4
# float64: the same comparisons where rounding is ~1e-16 relative; the layouts must agree to ~1e-10, so any
# disagreement at 1e-9 is a real difference in what is computed (a token seeing what it should not, say).
FP64_RTOL = 1e-9


def seeded_lora(backend: TorchBackend) -> None:
    """Non-zero LoRA B matrices (the same in every backend, whatever the process's hash seed)."""
    with torch.no_grad():
        for name, parameter in backend.model.named_parameters():
            if "lora_B" in name:
                torch.manual_seed(zlib.crc32(name.encode()))
                parameter.copy_(torch.randn(parameter.shape, dtype=torch.float64) * 0.05)


def demo_backends(dtype: str) -> list[TorchBackend]:
    made = []
    for share in (True, False):
        backend = TorchBackend(device="cpu", dtype=dtype, share_prompts=share)
        backend.load_model(str(DEMO_MODEL))
        if dtype == "float64":
            float64_throughout(backend.model)
        backend.seed(0)
        backend.attach_lora(LoraConfig(rank=4, alpha=8))
        seeded_lora(backend)
        made.append(backend)
    return made


def assert_same(shared: TorchBackend, plain: TorchBackend, batch, rtol: float) -> None:
    assert kernel_inputs(batch, True)[2] and not kernel_inputs(batch, False)[2]
    for adapter in (True, False):
        np.testing.assert_allclose(
            shared.sequence_logps(batch, adapter=adapter), plain.sequence_logps(batch, adapter=adapter), rtol=rtol
        )
    reference = plain.sequence_logps(batch, adapter=False)
    policy = plain.sequence_logps(batch, adapter=True)
    objective = DPO(0.1)
    results = [b.forward_backward(batch, objective, reference, 0.5, 1.0) for b in (shared, plain)]
    logps = np.concatenate([reference, policy])
    for key, value in results[1].metrics.items():
        if key == "rewards/accuracies":  # a count: equal unless a margin is within rounding of zero
            assert results[0].metrics[key] == value, key
            continue
        assert results[0].metrics[key] == pytest.approx(value, **metric_bounds(key, rtol, objective.beta, logps)), key
    bounds = metric_bounds("rewards/margins", rtol, objective.beta, logps)
    np.testing.assert_allclose(results[0].margins, results[1].margins, rtol=rtol, atol=bounds["abs"])
    grads = [{n: p.grad for n, p in b.model.named_parameters() if p.requires_grad} for b in (shared, plain)]
    for name, expected in grads[1].items():
        # a gradient entry is a sum over every token with cancellation: bounded by rtol of the tensor's largest
        expected = expected.numpy()
        np.testing.assert_allclose(
            grads[0][name].numpy(), expected, rtol=rtol, atol=rtol * np.abs(expected).max(), err_msg=name
        )


@pytest.mark.parametrize(("dtype", "rtol"), [("float32", FP32_RTOL), ("float64", FP64_RTOL)])
def test_shared_equals_plain_on_the_demo(tmp_path: Path, dtype: str, rtol: float) -> None:
    shared, plain = demo_backends(dtype)
    pairs, _ = load_preferences(write_demo_subset(tmp_path / "p.jsonl", count=6))
    tokenized, _ = tokenize_pairs(pairs, ChatTokenizer(plain.tokenizer), max_length=128)
    assert_same(shared, plain, collate(tokenized, pad_id=0), rtol)


@pytest.fixture(scope="module")
def multi_turn_batch(fixture_data: Path, qwen_tokenizer):
    pairs, _ = load_preferences(fixture_data / "llamafactory_dpo_en_demo.json")
    multi_turn = [p for p in pairs if p.num_user_turns > 1][:3]
    tokenized, _ = tokenize_pairs(multi_turn, ChatTokenizer(qwen_tokenizer), max_length=1024, max_prompt_length=768)
    batch = collate(tokenized, pad_id=0)
    assert batch.prompt_lengths.min() > 200  # long prompts: the case that gains most
    packed = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized)
    assert packed < 0.8 * batch.input_ids.size  # the work saved
    return batch


@pytest.mark.parametrize(("dtype", "rtol"), [("float32", FP32_RTOL), ("float64", FP64_RTOL)])
def test_shared_equals_plain_on_long_multi_turn_prompts(multi_turn_batch, qwen_tokenizer, dtype: str, rtol: float):
    made = []
    for share in (True, False):  # one random model, loaded by both
        model = tiny_causal_lm("qwen2", vocab=len(qwen_tokenizer), tie=True, seed=7).to(getattr(torch, dtype))
        if dtype == "float64":
            float64_throughout(model)
        backend = TorchBackend(device="cpu", dtype=dtype, share_prompts=share)
        backend.use_model(model, qwen_tokenizer, "tiny")
        backend.attach_lora(LoraConfig(rank=4, alpha=8))
        seeded_lora(backend)
        made.append(backend)
    assert_same(*made, multi_turn_batch, rtol)
