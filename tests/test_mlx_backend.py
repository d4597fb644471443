"""The MLX backend (mlx[cpu] on Linux) against itself and against torch, on the same weights and batches.

Tolerances (float32): MLX's kernel equals MLX's naive full-logits path to 1e-5 relative; log-probs agree
with torch to 1e-4 relative; loss and every metric to 1e-4 relative. Rewards, margins and the loss are β times
differences of log-probs, so their float32 rounding is set by those log-probs, not by the (small) difference:
for them, 1e-4 relative to the metric or β × 1e-4 × twice the largest |log-prob| involved, whichever is larger
(``tests.helpers.metric_bounds``). After 3 AdamW steps from the same LoRA weights, each LoRA tensor agrees to 1e-3
relative (Frobenius norm of the difference over the norm of the tensor).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import mlx.nn as nn  # noqa: E402
import torch  # noqa: E402

from backends.mlx_backend import kernel as mlx_kernel  # noqa: E402
from backends.mlx_backend.backend import MlxBackend  # noqa: E402
from backends.torch_backend.backend import TorchBackend  # noqa: E402
from core.batching import collate  # noqa: E402
from core.config import LoraConfig, ObjectiveConfig  # noqa: E402
from core.data import load_preferences  # noqa: E402
from core.objectives import build_objective  # noqa: E402
from core.tokenization import ChatTokenizer, tokenize_pairs  # noqa: E402
from tests.helpers import DEMO_MODEL, metric_bounds, write_demo_subset  # noqa: E402

LORA = LoraConfig(rank=4, alpha=8)


@pytest.fixture(scope="module")
def pair_batches(tmp_path_factory):
    from transformers import AutoTokenizer

    path = write_demo_subset(tmp_path_factory.mktemp("data") / "p.jsonl", count=12, seed=3)
    pairs, _ = load_preferences(path)
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(DEMO_MODEL))
    tokenized, _ = tokenize_pairs(pairs, chat, max_length=128)
    return [collate(tokenized[i : i + 4], chat.pad_id, pad_to_multiple_of=32) for i in (0, 4, 8)]


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """Both backends on the demo model, with the same non-trivial LoRA weights (torch's, transferred)."""
    torch_backend = TorchBackend(device="cpu")
    torch_backend.load_model(str(DEMO_MODEL))
    torch_backend.seed(0)
    torch_backend.attach_lora(LORA)
    with torch.no_grad():
        for name, parameter in torch_backend.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("adapter")
    torch_backend.save_adapter(folder)
    mlx_backend = MlxBackend(dtype="float32")
    mlx_backend.load_model(str(DEMO_MODEL))
    mlx_backend.seed(0)
    mlx_backend.attach_lora(LORA)
    mlx_backend.load_adapter(folder)
    return torch_backend, mlx_backend


def test_lora_weights_transfer_exactly(backends) -> None:
    torch_backend, mlx_backend = backends
    ours, theirs = mlx_backend.adapter_weights(), torch_backend.adapter_weights()
    assert ours.keys() == theirs.keys() and len(ours) == 4 * 7 * 2
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_mlx_kernel_matches_naive_logits(backends, pair_batches) -> None:
    _, mlx_backend = backends
    batch = pair_batches[0]
    model = mlx_backend.model
    input_ids, positions = mlx_backend._inputs(batch)
    loss_mask = mx.array(batch.loss_mask)
    token_logps = mlx_backend._token_logps()

    def fast(m):
        return mlx_kernel.sequence_logps(m, input_ids, positions, token_logps).sum()

    def naive(m):
        return mlx_kernel.naive_sequence_logps(m, input_ids, loss_mask).sum()

    fast_value, fast_grads = nn.value_and_grad(model, fast)(model)
    naive_value, naive_grads = nn.value_and_grad(model, naive)(model)
    per_row = mlx_kernel.sequence_logps(model, input_ids, positions, token_logps)
    np.testing.assert_allclose(
        np.array(per_row), np.array(mlx_kernel.naive_sequence_logps(model, input_ids, loss_mask)), rtol=1e-5
    )
    assert float(fast_value) == pytest.approx(float(naive_value), rel=1e-5)
    from mlx.utils import tree_flatten

    for (name, got), (_, expected) in zip(tree_flatten(fast_grads), tree_flatten(naive_grads), strict=True):
        expected = np.array(expected)
        np.testing.assert_allclose(np.array(got), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(), err_msg=name)


def test_sequence_logps_agree_with_torch(backends, pair_batches) -> None:
    torch_backend, mlx_backend = backends
    for batch in pair_batches:
        for adapter in (True, False):
            np.testing.assert_allclose(
                mlx_backend.sequence_logps(batch, adapter=adapter),
                torch_backend.sequence_logps(batch, adapter=adapter),
                rtol=1e-4,
            )


def rated(batch):
    """The batch as KTO examples: each chosen row a rated reply, its rejected row the mismatched one."""
    return dataclasses.replace(batch, labels=np.arange(batch.num_pairs) % 3 != 1)


@pytest.mark.parametrize("name", ["dpo", "dpo_norm", "simpo", "ipo", "hinge", "sft", "orpo", "kto"])
def test_loss_and_every_metric_agree_with_torch(backends, pair_batches, name: str) -> None:
    torch_backend, mlx_backend = backends
    objective = build_objective(ObjectiveConfig(name=name, label_smoothing=0.1 if name == "dpo" else 0.0))
    batch = rated(pair_batches[1]) if name == "kto" else pair_batches[1]
    nll_weight = 0.0 if name == "kto" else 0.5
    reference = torch_backend.sequence_logps(batch, adapter=False)
    ours = mlx_backend.evaluate(batch, objective, reference, nll_weight=nll_weight)
    theirs = torch_backend.evaluate(batch, objective, reference, nll_weight=nll_weight)
    assert ours.metrics.keys() == theirs.metrics.keys()
    # rewards: β · (log πθ - log πref), per token for dpo_norm and ipo; SimPO and SFT: (β ·) log πθ per token
    logps = np.concatenate([reference, torch_backend.sequence_logps(batch)])
    per = int(batch.response_lengths.min()) if name in ("dpo_norm", "ipo", "simpo", "sft", "orpo") else 1
    beta = objective.beta if hasattr(objective, "beta") else 1.0
    for key, value in theirs.metrics.items():
        assert ours.metrics[key] == pytest.approx(value, **metric_bounds(key, 1e-4, beta, logps, per)), key
    margin_slack = metric_bounds("rewards/margins", 1e-4, beta, logps, per)["abs"]
    np.testing.assert_allclose(ours.margins, theirs.margins, rtol=1e-4, atol=margin_slack)


@pytest.mark.parametrize("name", ["dpo", "kto"])
def test_three_optimizer_steps_agree_with_torch(backends, pair_batches, name: str) -> None:
    torch_backend, mlx_backend = backends
    objective = build_objective(ObjectiveConfig(name=name))
    for backend in backends:
        backend.setup_optimizer(weight_decay=0.01)
    for batch in pair_batches if name == "dpo" else [rated(b) for b in pair_batches]:
        reference = torch_backend.sequence_logps(batch, adapter=False)
        logps = np.concatenate([reference, torch_backend.sequence_logps(batch)])
        results = [b.forward_backward(batch, objective, reference, 0.0, 1.0) for b in backends]
        bounds = metric_bounds("loss", 1e-4, objective.beta, logps)
        assert results[1].metrics["loss"] == pytest.approx(results[0].metrics["loss"], **bounds)
        updates = [b.apply_gradients(lr=1e-3, max_grad_norm=1.0) for b in backends]
        assert updates[1].grad_norm == pytest.approx(updates[0].grad_norm, rel=1e-4)
    ours, theirs = mlx_backend.adapter_weights(), torch_backend.adapter_weights()
    for key, expected in theirs.items():
        relative = np.linalg.norm(ours[key] - expected) / np.linalg.norm(expected)
        assert relative < 1e-3, (key, relative)


def test_checkpoint_state_round_trips(backends, pair_batches, tmp_path: Path) -> None:
    _, mlx_backend = backends
    mlx_backend.setup_optimizer(weight_decay=0.0)
    objective = build_objective(ObjectiveConfig(name="simpo"))
    mlx_backend.forward_backward(pair_batches[0], objective, None, 0.0, 1.0)
    mlx_backend.apply_gradients(1e-3, 1.0)
    arrays, scalars = mlx_backend.optimizer_state()
    rng = mlx_backend.rng_state()
    mlx_backend.save_adapter(tmp_path)
    first = mlx_backend.forward_backward(pair_batches[1], objective, None, 0.0, 1.0)
    mlx_backend.apply_gradients(1e-3, 1.0)
    after = mlx_backend.adapter_weights()
    mlx_backend.load_adapter(tmp_path)
    mlx_backend.load_optimizer_state(arrays, scalars)
    mlx_backend.set_rng_state(rng)
    again = mlx_backend.forward_backward(pair_batches[1], objective, None, 0.0, 1.0)
    mlx_backend.apply_gradients(1e-3, 1.0)
    assert again.metrics == first.metrics
    replayed = mlx_backend.adapter_weights()
    for key in after:
        np.testing.assert_array_equal(replayed[key], after[key])


def test_shared_prompts_equal_the_unshared_path(backends, pair_batches) -> None:
    """Each prompt computed once (its keys and values reused by both replies) gives the same log-probs and
    LoRA gradients as computing it in both rows: 1e-4 relative, as on torch."""
    from mlx.utils import tree_flatten

    from backends.mlx_backend import shared_prompts

    _, mlx_backend = backends
    model = mlx_backend.model
    assert shared_prompts.can_share(model, gradient_checkpointing=False)
    assert not shared_prompts.can_share(model, gradient_checkpointing=True)
    token_logps = mlx_backend._token_logps()
    for batch in pair_batches:
        input_ids, positions = mlx_backend._inputs(batch)
        inputs = shared_prompts.shared_inputs(batch)
        sequences = input_ids.shape[0]

        def plain(m, input_ids=input_ids, positions=positions):
            return mlx_kernel.sequence_logps(m, input_ids, positions, token_logps)

        def shared(m, inputs=inputs, sequences=sequences):
            return shared_prompts.shared_sequence_logps(m, inputs, token_logps, sequences)

        np.testing.assert_allclose(np.array(shared(model)), np.array(plain(model)), rtol=1e-4)
        weights = mx.array(np.linspace(-1.0, 1.0, sequences).astype(np.float32))  # every row matters, differently
        _, got = nn.value_and_grad(model, lambda m, f=shared, w=weights: (f(m) * w).sum())(model)
        _, want = nn.value_and_grad(model, lambda m, f=plain, w=weights: (f(m) * w).sum())(model)
        for (name, g), (_, w) in zip(tree_flatten(got), tree_flatten(want), strict=True):
            w = np.array(w)
            np.testing.assert_allclose(np.array(g), w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=name)


def test_a_training_step_with_shared_prompts_equals_one_without(backends, pair_batches) -> None:
    """The compiled step itself, both ways: same metrics, margins and LoRA gradients (1e-4)."""
    from mlx.utils import tree_flatten

    _, mlx_backend = backends
    objective = build_objective(ObjectiveConfig(name="dpo"))
    batch = pair_batches[1]
    reference = np.full(len(batch.response_lengths), -50.0)
    results, grads = [], []
    try:
        for share in (True, False):
            mlx_backend.share_prompts = share
            assert mlx_backend._shares(batch) is share
            mlx_backend.discard_gradients()
            mlx_backend.seed(0)
            results.append(mlx_backend.forward_backward(batch, objective, reference, 0.0, 1.0))
            grads.append({k: np.array(v) for k, v in tree_flatten(mlx_backend._grads)})
    finally:
        mlx_backend.share_prompts = "auto"
        mlx_backend.discard_gradients()
    logps = np.concatenate([reference, mlx_backend.sequence_logps(batch)])
    for key, value in results[1].metrics.items():
        assert results[0].metrics[key] == pytest.approx(value, **metric_bounds(key, 1e-4, objective.beta, logps)), key
    slack = metric_bounds("rewards/margins", 1e-4, objective.beta, logps)["abs"]
    np.testing.assert_allclose(results[0].margins, results[1].margins, rtol=1e-4, atol=slack)
    for name, expected in grads[1].items():
        np.testing.assert_allclose(
            grads[0][name], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=name
        )
