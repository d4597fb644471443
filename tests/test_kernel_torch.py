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


def kernel_against_naive(
    model, chunk_size: int, rtol: float, vocab_block: int | None = None, frozen_head: bool = False
) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if frozen_head:  # as under LoRA: the gradient for the hidden states is formed in the forward pass
        model.get_output_embeddings().weight.requires_grad_(False)
    input_ids, attention_mask, loss_mask = tensors(random_batch(97, rows=6, seed=3))

    naive = naive_sequence_logps(model, input_ids, attention_mask, loss_mask)
    naive.sum().backward()
    naive_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    fast = masked_sequence_logps(
        model.get_decoder(),
        model.get_output_embeddings(),
        input_ids,
        attention_mask,
        loss_mask,
        chunk_size,
        logit_transform(model.config),
        vocab_block,
    )
    fast.sum().backward()
    assert fast.dtype == naive.dtype == torch.promote_types(model.dtype, torch.float32)
    np.testing.assert_allclose(fast.detach().numpy(), naive.detach().numpy(), rtol=rtol)
    assert (fast < 0).all()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None
            continue
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


# the tiny models' vocabulary has 97 entries: blocks of 5 leave a ragged last block of 2, blocks of 97 are one
@pytest.mark.parametrize("vocab_block", [5, 32, 97])
@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_the_vocabulary_in_blocks_matches_naive(vocab_block: int, frozen_head: bool, dtype: torch.dtype) -> None:
    """The online log-sum-exp over vocabulary blocks, and with a frozen head the gradient formed in the
    forward pass, equal the full-logits computation (an untied head, so freezing it freezes only the head)."""
    model = tiny_causal_lm("qwen2", tie=False).to(dtype)
    rtol = RTOL
    if dtype == torch.float64:
        float64_throughout(model)
        rtol = RTOL_FP64
    kernel_against_naive(model, 7, rtol, vocab_block=vocab_block, frozen_head=frozen_head)


@pytest.mark.parametrize("vocab_block", [None, 4])
def test_the_frozen_head_path_passes_gradcheck_in_float64(vocab_block: int | None) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64)
    bias = torch.randn(13, dtype=torch.float64)
    targets = torch.randint(0, 13, (9,))
    assert torch.autograd.gradcheck(
        lambda h: ChunkedTokenLogProbs.apply(h, weight, bias, targets, 4, vocab_block), (hidden,)
    )


def test_confident_tokens_keep_their_gradient_precision_in_float32() -> None:
    """For p(t) within 1e-5 of 1 the gradient W[t] - E_p[W] is 1e-5 the size of W's rows: forming it as
    that difference in float32 leaves it wrong by its own size (so does onehot - p, the recomputing backward's
    form), so the kernel sums only the other columns."""
    torch.manual_seed(0)
    vocab, width = 3000, 64
    weight = torch.randn(vocab, width) / width**0.5
    targets = torch.randint(0, vocab, (40,))
    margin = torch.linspace(12.0, 30.0, 40)  # log-odds of the target over the rest: p(t) from 1 - 1e-1 to ~1
    hidden = (weight[targets] * margin[:, None] / weight[targets].norm(dim=1, keepdim=True) ** 2).requires_grad_()
    ChunkedTokenLogProbs.apply(hidden, weight, None, targets, 16, 256).sum().backward()
    exact64 = hidden.detach().double().requires_grad_()
    torch.log_softmax(exact64 @ weight.double().T, -1).gather(1, targets[:, None]).sum().backward()
    errors = (hidden.grad.double() - exact64.grad).norm(dim=1) / exact64.grad.norm(dim=1)
    assert errors.max() < 1e-4, errors.max()


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


def test_the_head_is_blocked_for_the_cpu_cache_and_whole_on_a_gpu() -> None:
    from backends.torch_backend.kernel import CPU_BLOCK_FLOATS, head_blocking

    chunk, block = head_blocking("auto", 151_936, "cpu")
    assert chunk * block * 4 == CPU_BLOCK_FLOATS * 4 == 2 << 20  # one float32 block: 2 MiB
    assert head_blocking("auto", 512, "cpu") == (512, 512)  # a small vocabulary is one block
    assert head_blocking(4096, 151_936, "cpu") == (4096, 256)  # the floor on a block's width
    assert head_blocking("auto", 151_936, "cuda") == (128, None)  # memory bounds the chunk, no blocks


@pytest.mark.parametrize("vocab_block", [None, 256])
def test_log_probs_are_the_same_bits_with_and_without_the_gradient(vocab_block: int | None) -> None:
    """The reference pass (no gradient) and a policy whose adapter is still zero (the gradient formed in the
    forward pass) must agree exactly, or the first DPO loss is not log 2."""
    torch.manual_seed(0)
    hidden = torch.randn(300, 32)
    weight = torch.randn(1000, 32)
    targets = torch.randint(0, 1000, (300,))
    with torch.no_grad():
        reference = ChunkedTokenLogProbs.apply(hidden, weight, None, targets, 128, vocab_block)
    policy = ChunkedTokenLogProbs.apply(hidden.clone().requires_grad_(), weight, None, targets, 128, vocab_block)
    assert torch.equal(policy.detach(), reference)
