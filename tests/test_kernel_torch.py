"""The masked log-prob kernel equals the naive full-logits computation, values and gradients.

float32: 1e-5 relative on log-probs (a log-prob is a sum of a few dozen terms here, each rounded at ~1e-7).
Gradients: 1e-5 relative, plus 1e-5 of the largest gradient entry of the tensor as absolute slack: entries
that are sums with heavy cancellation (tied embeddings collect the head's and the input's gradient) differ in
float32 by summation order alone. float64 (every op float64, see ``float64_throughout``): the two paths compute
the same sums in another order, so they must agree to 1e-10 relative, with the same absolute slack for
gradients scaled to 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.torch_backend.kernel import (
    ChunkedTokenLogProbs,
    logit_transform,
    masked_sequence_logps,
    naive_sequence_logps,
)
from tests.helpers import float64_throughout, random_batch, tiny_causal_lm

RTOL = 1e-5
RTOL_FP64 = 1e-10


def tensors(batch):
    return tuple(torch.from_numpy(a).long() for a in (batch.input_ids, batch.attention_mask, batch.loss_mask))


def kernel_against_naive(model, chunk_size: int, rtol: float) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    input_ids, attention_mask, loss_mask = tensors(random_batch(97, rows=6, seed=3))

    naive = naive_sequence_logps(model, input_ids, attention_mask, loss_mask)
    naive.sum().backward()
    naive_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    fast = masked_sequence_logps(
        model.get_decoder(),
        model.get_output_embeddings(),
        input_ids,
        attention_mask,
        loss_mask,
        chunk_size,
        logit_transform(model.config),
    )
    fast.sum().backward()
    assert fast.dtype == naive.dtype == torch.promote_types(model.dtype, torch.float32)
    np.testing.assert_allclose(fast.detach().numpy(), naive.detach().numpy(), rtol=rtol)
    assert (fast < 0).all()
    for name, parameter in model.named_parameters():
        expected = naive_grads[name].numpy()
        np.testing.assert_allclose(
            parameter.grad.numpy(), expected, rtol=rtol, atol=rtol * np.abs(expected).max(), err_msg=name
        )


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
@pytest.mark.parametrize(
    ("kind", "extra"),
    [("llama", {}), ("qwen2", {"tie": False}), ("gemma2", {"final_logit_softcapping": 5.0})],
    ids=["llama-tied", "qwen2-untied", "gemma2-softcap"],
)
def test_kernel_matches_naive_logps_and_gradients(kind: str, extra: dict, chunk_size: int) -> None:
    tie = extra.pop("tie", True) if "tie" in extra else True
    kernel_against_naive(tiny_causal_lm(kind, tie=tie, **extra), chunk_size, RTOL)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
@pytest.mark.parametrize(("kind", "tie"), [("llama", True), ("qwen2", False)], ids=["llama-tied", "qwen2-untied"])
def test_kernel_matches_naive_exactly_in_float64(kind: str, tie: bool, chunk_size: int) -> None:
    model = tiny_causal_lm(kind, tie=tie).double()
    float64_throughout(model)
    kernel_against_naive(model, chunk_size, RTOL_FP64)


def test_fused_function_passes_gradcheck_in_float64() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (9,))
    assert torch.autograd.gradcheck(
        lambda h, w, b: ChunkedTokenLogProbs.apply(h, w, b, targets, 4), (hidden, weight, bias)
    )


def test_frozen_head_gets_no_weight_gradient_and_only_one_chunk_of_logits_lives() -> None:
    """With LoRA the head is frozen: backward computes the hidden-state gradient only."""
    torch.manual_seed(0)
    hidden = torch.randn(50, 8, requires_grad=True)
    weight = torch.randn(1000, 8)  # frozen
    targets = torch.randint(0, 1000, (50,))
    out = ChunkedTokenLogProbs.apply(hidden, weight, None, targets, 16)
    out.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    expected = torch.log_softmax(hidden.detach() @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    np.testing.assert_allclose(out.detach().numpy(), expected.numpy(), rtol=RTOL)


def test_padding_and_prompt_tokens_do_not_count() -> None:
    model = tiny_causal_lm("llama")
    input_ids, attention_mask, loss_mask = tensors(random_batch(97, rows=4, seed=1))
    with torch.no_grad():
        base = masked_sequence_logps(
            model.get_decoder(), model.get_output_embeddings(), input_ids, attention_mask, loss_mask, 64
        )
        garbage = input_ids.clone()
        garbage[attention_mask == 0] = 5  # different padding tokens: right padding is never attended to
        again = masked_sequence_logps(
            model.get_decoder(), model.get_output_embeddings(), garbage, attention_mask, loss_mask, 64
        )
    np.testing.assert_allclose(base.numpy(), again.numpy(), rtol=RTOL)
