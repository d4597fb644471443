"""Backward passes that keep less of the forward pass: attention and SwiGLU recompute what they need.

MLX differentiates ``mx.fast.scaled_dot_product_attention`` through its unfused fallback on the CPU (and, in
this MLX, on Metal), so a training step keeps every layer's ``[rows, heads, L, L]`` attention weights until
the backward pass reaches it; and ``silu(gate) * up`` keeps the sigmoid and the SiLU as well as its inputs.
On SmolLM2-135M that is about half of what a layer holds for the backward pass. Here both are
``mx.custom_function``s whose backward recomputes from the inputs the layer keeps anyway (queries, keys,
values; gate, up): the forward values are the same operations, bit for bit, and only the gradients' rounding
may differ.

The recomputation is made to depend on the incoming gradient (``mx.depends``), as ``mx.checkpoint`` does: a
compiled step would otherwise merge it with the forward pass's identical operations (common subexpressions)
and keep the very arrays it exists not to keep.

mlx-lm's model files call ``scaled_dot_product_attention`` and ``swiglu`` through their own module's globals,
so :func:`install` swaps those two names in the module of the model being trained; the functions fall back to
mlx-lm's own wherever they do not apply (a quantized KV cache, attention sinks).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import mlx.core as mx
from mlx_lm.models import activations, base

_MLX_LM_ATTENTION = base.scaled_dot_product_attention
_MLX_LM_SWIGLU = activations.swiglu


@functools.cache
def _attention(scale: float, mask_kind: str) -> Any:
    """Attention with a recomputing backward, for one scale and one kind of mask (none, "causal", an array)."""

    def forward(queries: mx.array, keys: mx.array, values: mx.array, *mask: mx.array) -> mx.array:
        if mask_kind == "array":
            return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask[0])
        causal = "causal" if mask_kind == "causal" else None
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=causal)

    @mx.custom_function
    def attention(*primals: mx.array) -> mx.array:
        return forward(*primals)

    @attention.vjp
    def attention_vjp(primals: tuple, cotangent: mx.array, output: mx.array) -> tuple:
        arrays = list(primals)
        inputs = mx.depends(arrays[:3], [cotangent])  # not merged with the forward's own products
        _, grads = mx.vjp(lambda q, k, v: forward(q, k, v, *arrays[3:]), inputs, [cotangent])
        return (*grads, *(mx.zeros_like(mask) for mask in arrays[3:]))  # a mask has no gradient

    return attention


def scaled_dot_product_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
    mask: mx.array | str | None,
    sinks: mx.array | None = None,
) -> mx.array:
    """mlx-lm's ``scaled_dot_product_attention``, with a backward pass that recomputes the attention weights."""
    if hasattr(cache, "bits") or sinks is not None or (isinstance(mask, str) and mask != "causal"):
        return _MLX_LM_ATTENTION(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    if mask is None or isinstance(mask, str):
        return _attention(float(scale), mask or "none")(queries, keys, values)
    return _attention(float(scale), "array")(queries, keys, values, mask)


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` whose backward recomputes the sigmoid instead of keeping it and the SiLU."""
    return _MLX_LM_SWIGLU(gate, up)


@swiglu.vjp
def _swiglu_vjp(primals: tuple, cotangent: mx.array, output: mx.array) -> tuple:
    gate, up = mx.depends(list(primals), [cotangent])
    sigmoid = mx.sigmoid(gate)
    silu = gate * sigmoid
    # d silu / d gate = σ(g) + g·σ(g)·(1 − σ(g))
    return cotangent * up * (sigmoid + silu * (1 - sigmoid)), cotangent * silu


def install(model: Any) -> list[str]:
    """Give the model's mlx-lm module the recomputing attention and SwiGLU; returns the names swapped (none
    for a model file that defines its own)."""
    module = sys.modules.get(type(model).__module__)
    swapped = []
    for name, theirs, ours in (
        ("scaled_dot_product_attention", _MLX_LM_ATTENTION, scaled_dot_product_attention),
        ("swiglu", _MLX_LM_SWIGLU, swiglu),
    ):
        current = getattr(module, name, None)
        if current is theirs:
            setattr(module, name, ours)
        if getattr(module, name, None) is ours:
            swapped.append(name)
    return swapped
