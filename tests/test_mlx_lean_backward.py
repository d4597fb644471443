"""The MLX backend's recomputing attention and SwiGLU (backends/mlx_backend/lean_backward.py).

Their forward passes are mlx-lm's own operations, so outputs must be equal bit for bit. Gradients are the same
mathematics in another order: float32 within 1e-5 relative to the largest entry; SwiGLU's hand-written
gradient against a float64 NumPy reference within float32's 1e-5. Memory: a compiled step over a few layers must keep
clearly less with them than with mlx-lm's (a recomputation merged back into the forward pass would not).
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx_lm.models import activations, base  # noqa: E402

from backends.mlx_backend import lean_backward  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, LENGTH = 4, 2, 16, 48


def _qkv(seed: int = 0, rows: int = 2, length: int = LENGTH) -> list:
    mx.random.seed(seed)
    return [
        mx.random.normal((rows, HEADS, length, HEAD_DIM)),
        mx.random.normal((rows, KV_HEADS, length, HEAD_DIM)),
        mx.random.normal((rows, KV_HEADS, length, HEAD_DIM)),
    ]


def _masks() -> dict:
    causal = np.tril(np.ones((LENGTH, LENGTH), dtype=bool))
    padded = causal.copy()
    padded[:, LENGTH - 5 :] = False  # padding keys hidden, as a shared-prompt batch has
    padded |= np.eye(LENGTH, dtype=bool)
    return {"none": None, "causal": "causal", "array": mx.array(padded)[None, None]}


def _relative(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("mask_name", ["none", "causal", "array"])
def test_attention_equals_mlx_lm_forward_exactly_and_backward_closely(mask_name: str) -> None:
    mask = _masks()[mask_name]
    primals = _qkv()
    weights = mx.random.normal(primals[0].shape)
    scale = HEAD_DIM**-0.5

    def loss(function):
        return lambda q, k, v: (function(q, k, v, cache=None, scale=scale, mask=mask) * weights).sum()

    ours_value, ours_grads = mx.value_and_grad(loss(lean_backward.scaled_dot_product_attention), (0, 1, 2))(*primals)
    theirs_value, theirs_grads = mx.value_and_grad(loss(base.scaled_dot_product_attention), (0, 1, 2))(*primals)
    ours_out = lean_backward.scaled_dot_product_attention(*primals, cache=None, scale=scale, mask=mask)
    theirs_out = base.scaled_dot_product_attention(*primals, cache=None, scale=scale, mask=mask)
    assert np.array_equal(np.array(ours_out), np.array(theirs_out))
    assert ours_value.item() == theirs_value.item()
    for ours, theirs in zip(ours_grads, theirs_grads, strict=True):
        assert _relative(ours, theirs) < 1e-5


def test_attention_under_compile_equals_the_uncompiled_gradient() -> None:
    primals = _qkv(1)
    weights = mx.random.normal(primals[0].shape)

    def loss(q, k, v):
        out = lean_backward.scaled_dot_product_attention(q, k, v, cache=None, scale=0.25, mask="causal")
        return (out * weights).sum()

    plain = mx.grad(loss, (0, 1, 2))(*primals)
    compiled = mx.compile(mx.grad(loss, (0, 1, 2)))(*primals)
    for a, b in zip(compiled, plain, strict=True):
        assert _relative(a, b) < 1e-6


def test_swiglu_gradient_against_float64_numpy() -> None:
    """The hand-written gradient against float64 NumPy (itself checked by central differences). MLX's
    float64 ``exp`` is float32-accurate on the CPU, so MLX runs float32 here, at float32's tolerance."""
    rng = np.random.default_rng(0)
    gate, up, cotangent = (rng.normal(scale=3.0, size=(64, 32)) for _ in range(3))

    def swiglu64(g: np.ndarray) -> np.ndarray:
        return g / (1 + np.exp(-g)) * up

    sigmoid = 1 / (1 + np.exp(-gate))
    expected_gate = cotangent * up * (sigmoid + gate * sigmoid * (1 - sigmoid))
    step = 1e-6
    central = cotangent * (swiglu64(gate + step) - swiglu64(gate - step)) / (2 * step)
    assert np.abs(central - expected_gate).max() < 1e-7 * np.abs(expected_gate).max()

    arrays = [mx.array(a.astype(np.float32)) for a in (gate, up, cotangent)]
    (out,), (grad_gate, grad_up) = mx.vjp(lean_backward.swiglu, arrays[:2], [arrays[2]])
    assert _relative(out, mx.array(swiglu64(gate))) < 1e-6
    assert _relative(grad_gate, mx.array(expected_gate)) < 1e-5
    assert _relative(grad_up, mx.array(cotangent * gate * sigmoid)) < 1e-5


def test_swiglu_equals_mlx_lm_forward_exactly_and_backward_closely() -> None:
    mx.random.seed(2)
    gate, up, weights = (mx.random.normal((2, 40, 96)) for _ in range(3))

    def loss(function):
        return lambda g, u: (function(g, u) * weights).sum()

    assert np.array_equal(np.array(lean_backward.swiglu(gate, up)), np.array(activations.swiglu(gate, up)))
    ours = mx.grad(loss(lean_backward.swiglu), (0, 1))(gate, up)
    theirs = mx.grad(loss(activations.swiglu), (0, 1))(gate, up)
    for a, b in zip(ours, theirs, strict=True):
        assert _relative(a, b) < 1e-5


def _peak_of_compiled_step(attention, swiglu, layers: int = 4) -> float:
    """Peak memory above the inputs of a compiled gradient through ``layers`` attention + SwiGLU blocks."""
    mx.random.seed(3)
    rows, length, width, hidden = 2, 192, HEADS * HEAD_DIM, 256
    x = mx.random.normal((rows, length, width))
    projections = [
        [mx.random.normal(shape) * 0.05 for shape in ((width, width), (width, 2 * hidden), (hidden, width))]
        for _ in range(layers)
    ]
    mx.eval(x, projections)

    def loss(x, projections):
        h = x
        for mix, expand, contract in projections:
            q = (h @ mix).reshape(rows, length, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
            k, v = q[:, :KV_HEADS], q[:, KV_HEADS:]
            a = attention(q, k, v, cache=None, scale=0.25, mask="causal")
            h = h + a.transpose(0, 2, 1, 3).reshape(rows, length, width)
            gate, up = mx.split(h @ expand, 2, axis=-1)
            h = h + swiglu(gate, up) @ contract
        return h.sum()

    step = mx.compile(mx.grad(loss, (0, 1)))
    mx.eval(step(x, projections))  # compile once; measure the second call
    baseline = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(step(x, projections))
    return mx.get_peak_memory() - baseline


def test_a_compiled_step_keeps_clearly_less() -> None:
    theirs = _peak_of_compiled_step(base.scaled_dot_product_attention, activations.swiglu)
    ours = _peak_of_compiled_step(lean_backward.scaled_dot_product_attention, lean_backward.swiglu)
    assert ours < 0.85 * theirs, (ours, theirs)  # 0.77 here; 0.99 when the recomputation is merged back


def test_install_swaps_only_mlx_lm_functions_and_is_idempotent() -> None:
    from mlx_lm.models import llama

    model = llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=32,
            num_hidden_layers=1,
            intermediate_size=64,
            num_attention_heads=4,
            rms_norm_eps=1e-5,
            vocab_size=50,
            num_key_value_heads=2,
        )
    )
    assert lean_backward.install(model) == ["scaled_dot_product_attention", "swiglu"]
    assert lean_backward.install(model) == ["scaled_dot_product_attention", "swiglu"]
    assert llama.scaled_dot_product_attention is lean_backward.scaled_dot_product_attention
    assert llama.swiglu is lean_backward.swiglu


def test_attention_sinks_and_quantized_caches_go_to_mlx_lm() -> None:
    q, k, v = _qkv(4)
    sinks = mx.zeros((HEADS,))
    ours = lean_backward.scaled_dot_product_attention(q, k, v, cache=None, scale=0.25, mask="causal", sinks=sinks)
    theirs = base.scaled_dot_product_attention(q, k, v, cache=None, scale=0.25, mask="causal", sinks=sinks)
    assert np.array_equal(np.array(ours), np.array(theirs))

    class QuantizedCache:
        bits, group_size = 8, 64

    called = []
    original = lean_backward._MLX_LM_ATTENTION
    try:
        lean_backward._MLX_LM_ATTENTION = lambda *args, **kwargs: called.append(kwargs["cache"]) or q
        lean_backward.scaled_dot_product_attention(q, k, v, cache=QuantizedCache(), scale=0.25, mask=None)
    finally:
        lean_backward._MLX_LM_ATTENTION = original
    assert len(called) == 1
