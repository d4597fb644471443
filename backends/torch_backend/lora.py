"""A LoRA linear layer whose update lands in the base product's output in one BLAS call.

PEFT computes ``base(x) + B(A(x)) · s``: after the two products it makes a scaled copy of the ``[tokens, out]``
update and then a third ``[tokens, out]`` tensor for the sum, and the backward pass scales the full-width
gradient once more. Those element-wise passes over every projection's output were a fifth of a SmolLM2 step on
the CPU (bench.profile_step). Here the base product's output is taken as the accumulator of one GEMM,
``out += s · (x Aᵀ) Bᵀ`` (``addmm_``), so the scale is applied inside the product, no full-width temporary is
made, and the backward pass scales only the rank-wide gradient.

It is the same sum in a different rounding order (equal to PEFT's within float32 rounding; exactly the same maths).
Under bf16 autocast with bf16 base weights (a CPU or GPU run with model.dtype=bfloat16) the products run in
bf16 as under PEFT, but the update is added inside the GEMM's fp32 accumulator, rounded once instead of twice,
and without PEFT's round trip of every input through fp32. Anything this path does not cover goes to PEFT's own
forward: a disabled or merged adapter, several active adapters, DoRA and other variants, dropout, a bias on
the B matrix (``lora_bias``), extra arguments, and mixed dtypes without autocast.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F


@functools.cache
def fused_lora_class(peft_linear: type) -> type:
    """A subclass of PEFT's ``lora.Linear`` with the fused forward (made per PEFT class, so isinstance checks,
    merging and saving all behave as PEFT's)."""

    class FusedLoraLinear(peft_linear):
        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            fused = self._fused_parts(x) if not (args or kwargs) else None
            if fused is None:
                return super().forward(x, *args, **kwargs)
            weight, bias, lora_a, lora_b, scaling = fused
            flat = x.reshape(-1, x.shape[-1])
            out = F.linear(flat, weight, bias)
            # under autocast the adapter's fp32 matrices are rounded to the products' dtype, as autocast would
            # (no-ops otherwise); in-place ops are outside autocast's reach, hence the explicit casts
            update = F.linear(flat, lora_a.to(out.dtype))
            # the base product's output is a fresh tensor its own backward does not need: safe to accumulate into
            out.addmm_(update, lora_b.to(out.dtype).t(), alpha=scaling)
            return out.view(*x.shape[:-1], out.shape[-1])

        def _fused_parts(self, x: torch.Tensor):
            if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
                return None
            name = self.active_adapters[0]
            if name not in self.lora_A or name in self.lora_variant:
                return None
            if not isinstance(self.lora_dropout[name], torch.nn.Identity):
                return None
            base = self.base_layer
            if type(base) is not torch.nn.Linear:
                return None
            if self.lora_B[name].bias is not None:  # PEFT's lora_bias=True (an adapter a user brings may have it)
                return None
            lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
            if base.weight.dtype != x.dtype:
                return None
            if torch.is_autocast_enabled(x.device.type):
                # bf16 base weights under bf16 autocast, fp32 adapter weights: the products all run in bf16
                if torch.get_autocast_dtype(x.device.type) != x.dtype:
                    return None
            elif lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
                return None
            return base.weight, base.bias, lora_a, lora_b, float(self.scaling[name])

    FusedLoraLinear.__name__ = FusedLoraLinear.__qualname__ = f"Fused{peft_linear.__name__}"
    return FusedLoraLinear


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every plain PEFT ``lora.Linear`` in ``model`` the fused forward; returns how many layers."""
    from peft.tuners.lora import Linear as PeftLoraLinear

    fused_class = fused_lora_class(PeftLoraLinear)
    count = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = fused_class
            count += 1
    return count
