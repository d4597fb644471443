"""Objectives: the worked examples, agreement with the float64 NumPy reference on NumPy, torch and MLX,
and gradients against finite differences of the reference.

Tolerances, all in float64: NumPy and torch values agree to 1e-9 relative (1e-12 absolute), tighter than
the 1e-6 asked. MLX values agree to 1e-6 relative (1e-9 absolute): on the CPU, MLX's float64 ``exp`` is
only float32-accurate (measured: 9e-8 relative error at x = 3, where log and log1p are exact), so 1e-6 is
what its float64 can promise. Gradients agree with central finite differences (step 1e-6) to 1e-6
relative (1e-8 absolute) on torch and MLX.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.config import ObjectiveConfig
from core.objectives import OBJECTIVES, NumpyOps, PolicyOutputs, build_objective, evaluate
from core.objectives.reference import reference_losses

VALUE_TOLERANCE = {"numpy": (1e-9, 1e-12), "torch": (1e-9, 1e-12), "mlx": (1e-6, 1e-9)}  # (rtol, atol)
GRAD_RTOL, GRAD_ATOL = 1e-6, 1e-8

CASES = [
    ("dpo", {"beta": 0.1}),
    ("dpo", {"beta": 0.3, "label_smoothing": 0.1}),
    ("dpo", {"beta": 0.2, "label_smoothing": 0.2, "robust": True}),
    ("dpo_norm", {"beta": 0.5}),
    ("dpo_norm", {"beta": 0.5, "label_smoothing": 0.1, "robust": True}),
    ("simpo", {"beta": 2.0, "gamma": 0.5}),
    ("simpo", {"beta": 2.5, "gamma": 1.25, "label_smoothing": 0.15}),
    ("ipo", {"beta": 0.1}),
    ("hinge", {"beta": 0.1}),
    ("sft", {}),
    ("orpo", {"beta": 0.1}),
    ("orpo", {"beta": 0.5}),
    ("kto", {"beta": 0.1}),
    ("kto", {"beta": 0.3, "desirable_weight": 1.33, "undesirable_weight": 0.8}),
]
CASE_IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in params.items())}" for name, params in CASES]


def make_objective(name: str, params: dict):
    config = ObjectiveConfig(
        name=name,
        beta=params.get("beta"),
        gamma=params.get("gamma"),
        label_smoothing=params.get("label_smoothing", 0.0),
        robust=params.get("robust", False),
        desirable_weight=params.get("desirable_weight"),
        undesirable_weight=params.get("undesirable_weight"),
    )
    return build_objective(config.validate() or config)


def random_inputs(seed: int, pairs: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    chosen_lengths = rng.integers(1, 300, pairs).astype(np.float64)
    rejected_lengths = rng.integers(1, 300, pairs).astype(np.float64)
    ref_chosen = -chosen_lengths * rng.uniform(0.2, 3.0, pairs)
    ref_rejected = -rejected_lengths * rng.uniform(0.2, 3.0, pairs)
    # a log-probability is < 0: a sequence's is capped at −0.001 (ORPO's log(1 − P) needs P < 1)
    return {
        "policy_chosen": np.minimum(ref_chosen + rng.normal(0, 8, pairs), -1e-3),
        "policy_rejected": np.minimum(ref_rejected + rng.normal(0, 8, pairs), -1e-3),
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "reference_chosen": ref_chosen,
        "reference_rejected": ref_rejected,
        "labels": rng.random(pairs) < 0.6,  # KTO's ratings; the pairwise objectives ignore them
    }


def to_outputs(inputs: dict[str, np.ndarray], convert) -> PolicyOutputs:
    return PolicyOutputs(
        convert(inputs["policy_chosen"]),
        convert(inputs["policy_rejected"]),
        convert(inputs["chosen_lengths"]),
        convert(inputs["rejected_lengths"]),
        convert(inputs["reference_chosen"]),
        convert(inputs["reference_rejected"]),
        convert(inputs["labels"].astype(np.float64)),
    )


def backend_ops(name: str):
    """(ops, to-array, to-numpy) for a backend, all in float64."""
    if name == "numpy":
        return NumpyOps(), np.asarray, np.asarray
    if name == "torch":
        import torch

        from backends.torch_backend.ops import TorchOps

        return TorchOps(), lambda a: torch.tensor(a, dtype=torch.float64), lambda t: t.detach().numpy()
    import mlx.core as mx

    from backends.mlx_backend.ops import MlxOps

    return MlxOps(), lambda a: mx.array(a, dtype=mx.float64), lambda a: np.array(a)


@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
def test_worked_examples(backend: str) -> None:
    ops, array, to_numpy = backend_ops(backend)
    one = array(np.array([1.0]))
    # DPO: Δθ = log πθ(y_w) - log πθ(y_l) = 2.5, Δref = -0.5, β = 0.1 → -log σ(0.3)
    dpo = evaluate(
        make_objective("dpo", {"beta": 0.1}),
        ops,
        PolicyOutputs(
            array(np.array([-10.0])),
            array(np.array([-12.5])),
            one,
            one,
            array(np.array([-7.0])),
            array(np.array([-6.5])),
        ),
    )
    assert float(to_numpy(dpo.loss)) == pytest.approx(0.55436, abs=1e-5)
    # SimPO: average log-probs -0.5 (chosen, 8 tokens) and -1.0 (rejected, 20 tokens), β = 2, γ = 0.5
    simpo = evaluate(
        make_objective("simpo", {"beta": 2.0, "gamma": 0.5}),
        ops,
        PolicyOutputs(
            array(np.array([-4.0])), array(np.array([-20.0])), array(np.array([8.0])), array(np.array([20.0]))
        ),
    )
    rtol, atol = VALUE_TOLERANCE[backend]
    assert float(to_numpy(simpo.loss)) == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))), rel=rtol, abs=atol)
    assert float(to_numpy(simpo.loss)) == pytest.approx(0.47408, abs=1e-5)


@pytest.mark.parametrize("nll_weight", [0.0, 0.7])
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
def test_objective_matches_the_float64_reference(backend: str, name: str, params: dict, nll_weight: float) -> None:
    ops, array, to_numpy = backend_ops(backend)
    objective = make_objective(name, params)
    rtol, atol = VALUE_TOLERANCE[backend]
    for seed in range(3):
        inputs = random_inputs(seed)
        expected = reference_losses(name, **inputs, **params, nll_weight=nll_weight)
        result = evaluate(objective, ops, to_outputs(inputs, array), nll_weight=nll_weight)
        np.testing.assert_allclose(to_numpy(result.losses), expected["losses"], rtol=rtol, atol=atol)
        np.testing.assert_allclose(to_numpy(result.chosen_rewards), expected["chosen_rewards"], rtol=rtol, atol=atol)
        np.testing.assert_allclose(
            to_numpy(result.rejected_rewards), expected["rejected_rewards"], rtol=rtol, atol=atol
        )
        assert set(result.metrics) == set(expected["metrics"])
        for key, value in expected["metrics"].items():
            np.testing.assert_allclose(to_numpy(result.metrics[key]), value, rtol=rtol, atol=atol, err_msg=key)


def finite_difference_grad(name: str, params: dict, inputs: dict, nll_weight: float, step: float = 1e-6):
    if name == "kto":  # z0 is detached: hold it at its value here, as the objective's gradient does
        params = {**params, "kl_estimate": float(reference_losses(name, **inputs, **params)["metrics"]["kl"])}
    grads = {}
    for key in ("policy_chosen", "policy_rejected"):
        grad = np.zeros_like(inputs[key])
        for i in range(len(grad)):
            up, down = dict(inputs), dict(inputs)
            up[key] = inputs[key].copy()
            down[key] = inputs[key].copy()
            up[key][i] += step
            down[key][i] -= step
            grad[i] = (
                reference_losses(name, **up, **params, nll_weight=nll_weight)["loss"]
                - reference_losses(name, **down, **params, nll_weight=nll_weight)["loss"]
            ) / (2 * step)
        grads[key] = grad
    return grads


@pytest.mark.parametrize("nll_weight", [0.0, 0.7])
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_gradients_match_finite_differences(backend: str, name: str, params: dict, nll_weight: float) -> None:
    inputs = random_inputs(11, pairs=16)
    expected = finite_difference_grad(name, params, inputs, nll_weight)
    objective = make_objective(name, params)
    if backend == "torch":
        import torch

        from backends.torch_backend.ops import TorchOps

        out = to_outputs(inputs, lambda a: torch.tensor(a, dtype=torch.float64))
        chosen, rejected = out.chosen_logps.requires_grad_(), out.rejected_logps.requires_grad_()
        evaluate(objective, TorchOps(), out, nll_weight=nll_weight).loss.backward()
        got = {
            key: (np.zeros(len(t)) if t.grad is None else t.grad.numpy())  # SFT never touches rejected
            for key, t in (("policy_chosen", chosen), ("policy_rejected", rejected))
        }
    else:
        import mlx.core as mx

        from backends.mlx_backend.ops import MlxOps

        out = to_outputs(inputs, lambda a: mx.array(a, dtype=mx.float64))

        def loss_fn(chosen, rejected):
            replaced = PolicyOutputs(
                chosen,
                rejected,
                out.chosen_lengths,
                out.rejected_lengths,
                out.reference_chosen_logps,
                out.reference_rejected_logps,
                out.labels,
            )
            return evaluate(objective, MlxOps(), replaced, nll_weight=nll_weight).loss

        grad_chosen, grad_rejected = mx.grad(loss_fn, argnums=(0, 1))(out.chosen_logps, out.rejected_logps)
        got = {"policy_chosen": np.array(grad_chosen), "policy_rejected": np.array(grad_rejected)}
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=key)
        if name not in ("sft", "kto") or key == "policy_chosen":  # neither differentiates the rejected rows
            assert np.abs(got[key]).sum() > 0, "a gradient that is all zero cannot be checked"


def test_every_objective_is_covered_and_says_whether_it_needs_a_reference() -> None:
    assert {name for name, _ in CASES} == set(OBJECTIVES)
    assert {name for name, cls in OBJECTIVES.items() if cls.is_reference_free} == {"simpo", "sft", "orpo"}


@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
def test_extreme_logits_stay_finite(backend: str) -> None:
    ops, array, to_numpy = backend_ops(backend)
    big = array(np.array([5000.0, -5000.0]))
    zero, one = array(np.array([0.0, 0.0])), array(np.array([1.0, 1.0]))
    for name, params in CASES:
        objective = make_objective(name, params)
        result = evaluate(objective, ops, PolicyOutputs(big, -big, one, one, zero, zero, one), nll_weight=0.1)
        assert np.all(np.isfinite(to_numpy(result.losses))), name


def test_simpo_gamma_from_ratio_and_defaults() -> None:
    simpo = build_objective(ObjectiveConfig(name="simpo", beta=2.0, gamma_beta_ratio=0.25))
    assert (simpo.beta, simpo.gamma) == (2.0, 0.5)
    assert build_objective(ObjectiveConfig(name="simpo")).gamma == pytest.approx(1.0)  # β 2.0 × ratio 0.5
    assert build_objective(ObjectiveConfig(name="dpo")).beta == 0.1


def test_reference_objectives_refuse_to_run_without_reference_logps() -> None:
    ones = np.ones(2)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        evaluate(make_objective("dpo", {"beta": 0.1}), NumpyOps(), PolicyOutputs(ones, ones, ones, ones))


@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
@pytest.mark.parametrize("mean_logp", [-1e-6, -1e-3, -0.5, -0.7, -40.0, -700.0])
def test_orpo_is_exact_where_a_reply_is_almost_certain_or_almost_impossible(backend: str, mean_logp: float) -> None:
    """P(y|x) = e^p̄ near 1 (p̄ → 0: log(1 − P) is a difference of nearly equal numbers) and near 0 (p̄ very
    negative: 1 − P rounds to 1): log1mexp keeps full precision in both, values and gradients."""
    ops, array, to_numpy = backend_ops(backend)
    lengths = np.array([7.0, 3.0])
    inputs = {
        "policy_chosen": np.array([mean_logp, 2 * mean_logp]) * lengths,
        "policy_rejected": np.array([3 * mean_logp, mean_logp / 2]) * lengths,
        "chosen_lengths": lengths,
        "rejected_lengths": lengths,
        "reference_chosen": None,
        "reference_rejected": None,
    }
    expected = reference_losses("orpo", **inputs, beta=0.1)
    objective = make_objective("orpo", {"beta": 0.1})
    out = PolicyOutputs(
        *(array(inputs[k]) for k in ("policy_chosen", "policy_rejected", "chosen_lengths", "rejected_lengths"))
    )
    rtol, atol = VALUE_TOLERANCE[backend]
    result = evaluate(objective, ops, out)
    np.testing.assert_allclose(to_numpy(result.losses), expected["losses"], rtol=rtol, atol=atol)
    for key in ("log_odds_ratio", "log_odds_chosen"):
        np.testing.assert_allclose(to_numpy(result.metrics[key]), expected["metrics"][key], rtol=rtol, atol=atol)
    if backend == "torch":
        import torch

        chosen = torch.tensor(inputs["policy_chosen"], dtype=torch.float64, requires_grad=True)
        rejected = torch.tensor(inputs["policy_rejected"], dtype=torch.float64, requires_grad=True)
        lengths_t = torch.tensor(lengths, dtype=torch.float64)
        evaluate(objective, ops, PolicyOutputs(chosen, rejected, lengths_t, lengths_t)).loss.backward()
        # central differences with a step relative to the value (p̄ = −1e-6 leaves little room)
        step = 1e-3 * abs(mean_logp) * lengths.min()
        expected_grads = finite_difference_grad("orpo", {"beta": 0.1}, inputs, 0.0, step=step)
        np.testing.assert_allclose(chosen.grad.numpy(), expected_grads["policy_chosen"], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(rejected.grad.numpy(), expected_grads["policy_rejected"], rtol=1e-5, atol=1e-9)


def test_orpo_refuses_an_extra_nll_term() -> None:
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="ORPO has its own NLL term"):
        ObjectiveConfig(name="orpo", nll_weight=1.0).validate()


@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
@pytest.mark.parametrize("classes", ["desirable", "undesirable", "mixed"])
@pytest.mark.parametrize("kl", ["positive", "clamped"])
def test_kto_on_one_class_batches_and_both_sides_of_the_kl_clamp(backend: str, classes: str, kl: str) -> None:
    """All-desirable and all-undesirable batches (a class absent: its metrics are 0, the loss is the other
    class's), and z0 both above 0 and clamped at 0; values and gradients against the reference."""
    ops, array, to_numpy = backend_ops(backend)
    inputs = random_inputs(5, pairs=12)
    inputs["labels"] = {"desirable": np.ones(12, bool), "undesirable": np.zeros(12, bool)}.get(
        classes, np.arange(12) % 3 == 0
    )
    shift = 6.0 if kl == "positive" else -6.0  # the mismatched rows' mean log-ratio, before the clamp
    inputs["policy_rejected"] = inputs["reference_rejected"] + shift + np.linspace(-1, 1, 12)
    params = {"beta": 0.2, "desirable_weight": 1.5, "undesirable_weight": 0.7}
    expected = reference_losses("kto", **inputs, **params)
    assert (expected["metrics"]["kl"] > 0) == (kl == "positive")
    objective = make_objective("kto", params)
    result = evaluate(objective, ops, to_outputs(inputs, array))
    rtol, atol = VALUE_TOLERANCE[backend]
    np.testing.assert_allclose(to_numpy(result.losses), expected["losses"], rtol=rtol, atol=atol)
    for key, value in expected["metrics"].items():
        np.testing.assert_allclose(to_numpy(result.metrics[key]), value, rtol=rtol, atol=atol, err_msg=key)
    if classes != "mixed":
        absent = "rejected" if classes == "desirable" else "chosen"
        assert float(to_numpy(result.metrics[f"rewards/{absent}"])) == 0.0
    if backend == "torch":
        import torch

        from backends.torch_backend.ops import TorchOps

        out = to_outputs(inputs, lambda a: torch.tensor(a, dtype=torch.float64))
        chosen = out.chosen_logps.requires_grad_()
        evaluate(objective, TorchOps(), out).loss.backward()
        expected_grads = finite_difference_grad("kto", params, inputs, 0.0)
        np.testing.assert_allclose(chosen.grad.numpy(), expected_grads["policy_chosen"], rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_kto_refuses_an_nll_term_and_takes_its_class_weights() -> None:
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="KTO takes no NLL term"):
        ObjectiveConfig(name="kto", nll_weight=1.0).validate()
    with pytest.raises(ConfigError, match="desirable_weight applies to kto only, not dpo"):
        ObjectiveConfig(name="dpo", desirable_weight=1.2).validate()
    with pytest.raises(ConfigError, match="must be > 0"):
        ObjectiveConfig(name="kto", undesirable_weight=0.0).validate()
    from core.config import config_from_dict

    with pytest.raises(ConfigError, match=r"data\.unpaired splits pairs into rated examples for kto; objective dpo"):
        config_from_dict({"data": {"unpaired": True}, "objective": {"name": "dpo"}}).validate()
    kto = build_objective(ObjectiveConfig(name="kto", desirable_weight=1.3))
    assert (kto.beta, kto.desirable_weight, kto.undesirable_weight) == (0.1, 1.3, 1.0)


def test_kto_reference_point_under_torchrun_is_the_global_batchs() -> None:
    """Two processes, each with half of a global batch: z0 is the mean of both halves' means (TRL gathers it
    across processes), so each process's losses are the global batch's, not those of a batch of its own."""
    import torch

    from backends.torch_backend.ops import TorchOps
    from core.distributed import Collective

    inputs = random_inputs(7, pairs=12)
    inputs["policy_rejected"] = inputs["reference_rejected"] + 6.0 + np.linspace(-5, 5, 12)  # z0 > 0
    halves = {key: (value[:6], value[6:]) for key, value in inputs.items()}
    means = [
        float(np.mean(h_p - h_r))
        for h_p, h_r in zip(halves["policy_rejected"], halves["reference_rejected"], strict=True)
    ]
    assert abs(means[0] - means[1]) > 1.0  # the halves' own z0s differ

    class OtherHalf(Collective):  # rank 0 of 2; the all-reduce adds what rank 1 contributes
        def _all_reduce(self, values: np.ndarray) -> np.ndarray:
            return values + means[1]

    params = {"beta": 0.2, "desirable_weight": 1.5, "undesirable_weight": 0.7}
    objective = make_objective("kto", params)
    first_half = {key: pieces[0] for key, pieces in halves.items()}
    out = to_outputs(first_half, lambda a: torch.tensor(a, dtype=torch.float64))
    result = evaluate(objective, TorchOps(OtherHalf(world_size=2)), out)
    expected = reference_losses("kto", **first_half, **params, kl_estimate=max(float(np.mean(means)), 0.0))
    np.testing.assert_allclose(result.losses.numpy(), expected["losses"], rtol=1e-12)
    assert float(result.metrics["kl"]) == pytest.approx(np.mean(means), rel=1e-12)
    alone = evaluate(objective, TorchOps(), out)  # one process: its own half's z0
    assert float(alone.metrics["kl"]) == pytest.approx(means[0], rel=1e-12)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_per_example_loss_is_declared_truly(name: str) -> None:
    """Where an objective declares each example's loss its own (so the torch backend may step pair by pair and add
    up the gradients), an example's loss is the same alone as beside others; KTO's z0 makes it differ."""
    objective = build_objective(ObjectiveConfig(name=name))
    rng = np.random.default_rng(5)
    count = 4
    chosen, rejected = -rng.uniform(20, 80, count), -rng.uniform(20, 80, count)
    ref_chosen, ref_rejected = chosen + rng.normal(0, 3, count), rejected + rng.normal(0, 3, count)
    lengths = rng.integers(10, 40, (2, count)).astype(float)
    labels = np.array([1.0, 0.0, 1.0, 0.0]) if objective.unpaired else None

    def losses(rows: slice) -> np.ndarray:
        out = PolicyOutputs(
            chosen[rows], rejected[rows], lengths[0, rows], lengths[1, rows],
            ref_chosen[rows], ref_rejected[rows], None if labels is None else labels[rows],
        )  # fmt: skip
        return np.asarray(objective(NumpyOps(), out)[0])

    together = losses(slice(None))
    alone = np.concatenate([losses(slice(i, i + 1)) for i in range(count)])
    assert np.allclose(together, alone, rtol=1e-12, atol=0) == objective.per_example_loss
