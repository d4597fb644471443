"""Training steps one pair at a time (``TorchBackend._pair_by_pair``), where rows run one by one: the same
log-probs bit for bit, the same metrics and margins, and the batch's gradients (float64 to 1e-9 relative,
float32 within the rounding test_shared_prompts.py derives), for every pair-wise objective, with the NLL term
and a micro-batch's scale; only one pair's activations wait for a backward pass at a time; and KTO, whose z0
spans the batch, keeps the batched step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.torch_backend import backend as torch_backend
from core.batching import collate
from core.objectives import DPO, IPO, KTO, ORPO, SimPO
from tests.helpers import metric_bounds
from tests.test_padding_free import tiny_backend, uneven_pairs  # noqa: F401 (a fixture)
from tests.test_shared_prompts import FP32_RTOL, FP64_RTOL

OBJECTIVES = {
    "dpo": lambda: DPO(0.1),
    "ipo": lambda: IPO(0.1),
    "simpo": lambda: SimPO(2.0, gamma=0.5),
    "orpo": lambda: ORPO(0.1),
}


def step(backend, batch, objective, reference, *, by_pair: bool, monkeypatch):
    """One forward/backward, pair by pair or (the rule patched off) as one batch; its result and gradients."""
    with monkeypatch.context() as patch:
        if not by_pair:
            patch.setattr(torch_backend, "pair_by_pair", lambda *args: False)
        result = backend.forward_backward(batch, objective, reference, 0.5, 0.75)
    grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.requires_grad}
    backend.model.zero_grad(set_to_none=True)
    return result, grads


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize(("dtype", "rtol"), [("float32", FP32_RTOL), ("float64", FP64_RTOL)])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_pair_by_pair_equals_the_batch(uneven_pairs, qwen_tokenizer, monkeypatch, share, dtype, rtol, name):  # noqa: F811
    backend = tiny_backend(qwen_tokenizer, dtype, share=share, padding_free=True)
    batch = collate(uneven_pairs, pad_id=0)
    reference = backend.sequence_logps(batch, adapter=False)
    objective = OBJECTIVES[name]()
    logps = np.concatenate([reference, backend.sequence_logps(batch)])
    (by_pair, by_pair_grads), (whole, whole_grads) = (
        step(backend, batch, objective, reference, by_pair=flag, monkeypatch=monkeypatch) for flag in (True, False)
    )
    # each row is run alone either way, so the log-probs (hence margins and accuracies) are the same bits
    np.testing.assert_array_equal(by_pair.margins, whole.margins)
    beta = getattr(objective, "beta", 0.1)
    for key, value in whole.metrics.items():
        assert by_pair.metrics[key] == pytest.approx(value, **metric_bounds(key, rtol, beta, logps)), key
    assert whole_grads
    for key, expected in whole_grads.items():
        expected = expected.numpy()
        np.testing.assert_allclose(
            by_pair_grads[key].numpy(), expected, rtol=rtol, atol=rtol * np.abs(expected).max(), err_msg=key
        )


def saved_bytes_before_each_backward(backend, batch, objective, reference, monkeypatch) -> list[int]:
    """The bytes autograd holds for the backward pass each time one starts (weights aside)."""
    weights = {p.untyped_storage().data_ptr() for p in backend.model.parameters()}
    held: dict[int, int] = {}
    before: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            held[storage.data_ptr()] = storage.nbytes()
        return tensor

    backward = backend._backward

    def spy(loss: torch.Tensor) -> None:
        before.append(sum(held.values()))
        backward(loss)
        held.clear()

    with monkeypatch.context() as patch, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        patch.setattr(backend, "_backward", spy)
        backend.forward_backward(batch, objective, reference, 0.0, 1.0)
    backend.model.zero_grad(set_to_none=True)
    return before


def test_one_pair_waits_for_the_backward_pass_at_a_time(uneven_pairs, qwen_tokenizer, monkeypatch):  # noqa: F811
    backend = tiny_backend(qwen_tokenizer, "float32", share=True, padding_free=True)
    batch = collate(uneven_pairs, pad_id=0)
    reference = backend.sequence_logps(batch, adapter=False)
    by_pair = saved_bytes_before_each_backward(backend, batch, DPO(0.1), reference, monkeypatch)
    alone = [
        saved_bytes_before_each_backward(
            backend, batch.pair(i), DPO(0.1), reference[[i, batch.num_pairs + i]], monkeypatch
        )[0]
        for i in range(batch.num_pairs)
    ]
    assert by_pair == alone  # one backward per pair, each holding that pair's activations only
    monkeypatch.setattr(torch_backend, "pair_by_pair", lambda *args: False)
    (whole,) = saved_bytes_before_each_backward(backend, batch, DPO(0.1), reference, monkeypatch)
    assert max(by_pair) < 0.6 * whole


def test_the_rule(uneven_pairs, qwen_tokenizer):  # noqa: F811
    backend = tiny_backend(qwen_tokenizer, "float32", share=True, padding_free=True)
    batch = collate(uneven_pairs, pad_id=0)
    layout = backend._layout(batch)
    assert torch_backend.pair_by_pair(layout, DPO(0.1), batch.num_pairs)
    assert not torch_backend.pair_by_pair(layout, KTO(0.1), batch.num_pairs)  # z0 spans the batch
    assert not torch_backend.pair_by_pair(layout, DPO(0.1), 1)  # nothing to split
    backend.padding_free = False  # a padded batch runs its rows together: splitting it would cost time
    assert not torch_backend.pair_by_pair(backend._layout(batch), DPO(0.1), batch.num_pairs)


def test_a_pair_cut_from_its_batch(uneven_pairs):  # noqa: F811
    batch = collate(uneven_pairs, pad_id=0)
    for index, pair in enumerate(uneven_pairs):
        one = batch.pair(index)
        alone = collate([pair], pad_id=0)
        for field in ("input_ids", "attention_mask", "loss_mask", "response_lengths", "prompt_lengths"):
            np.testing.assert_array_equal(getattr(one, field), getattr(alone, field), err_msg=field)
        assert one.pair_indices.tolist() == [pair.index]
