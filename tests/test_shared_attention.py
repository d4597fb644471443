"""The shared-prompt row's attention in two causal parts equals masked attention over the packed row: outputs
and gradients, float64 to 1e-12, with grouped key/value heads and a scale, as transformers calls it."""

from __future__ import annotations

import pytest
import torch

from backends.torch_backend.kernel import shared_prompt_mask
from backends.torch_backend.shared_attention import NAME, register, shared_prompt_attention
from core.batching import SharedPromptBatch


class Attention(torch.nn.Module):
    num_key_value_groups = 3  # 6 query heads over 2 key/value heads
    is_causal = True


def masked_reference(query, key, value, parts, scaling):
    """What the packed row computes: SDPA over it under the shared-prompt mask (kernel.shared_prompt_mask)."""
    prompt, chosen, rejected = parts
    segments = torch.tensor(
        [
            [SharedPromptBatch.PROMPT] * prompt
            + [SharedPromptBatch.CHOSEN] * chosen
            + [SharedPromptBatch.REJECTED] * rejected
        ]
    )
    key = key.repeat_interleave(3, dim=1)
    value = value.repeat_interleave(3, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=shared_prompt_mask(segments), scale=scaling
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("parts", [(5, 7, 9), (1, 1, 1), (12, 3, 20), (30, 25, 2)])
def test_two_causal_parts_equal_the_masked_row(parts: tuple[int, int, int]) -> None:
    length = sum(parts)
    generator = torch.Generator().manual_seed(sum(parts))
    make = lambda heads: torch.randn(1, heads, length, 8, dtype=torch.float64, generator=generator, requires_grad=True)  # noqa: E731
    query, key, value = make(6), make(2), make(2)
    split, _ = shared_prompt_attention(Attention(), query, key, value, None, scaling=0.3, shared_prompt=parts)
    expected = masked_reference(query, key, value, parts, 0.3)
    assert split.shape == (1, length, 6, 8)
    torch.testing.assert_close(split, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(split.shape, dtype=torch.float64, generator=generator)
    grads = torch.autograd.grad((split * weights).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (query, key, value))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_without_parts_it_is_transformers_sdpa() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, h, 10, 8, generator=generator) for h in (6, 2, 2))
    ours, _ = shared_prompt_attention(Attention(), query, key, value, None, scaling=0.5)
    theirs, _ = sdpa_attention_forward(Attention(), query, key, value, None, scaling=0.5)
    assert torch.equal(ours, theirs)


def test_registered_with_transformers() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    register()
    register()  # twice is fine
    assert ALL_ATTENTION_FUNCTIONS[NAME] is shared_prompt_attention
    assert NAME in ALL_MASK_ATTENTION_FUNCTIONS
