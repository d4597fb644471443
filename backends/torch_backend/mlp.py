"""A SwiGLU block whose backward pass keeps two of the four ``[tokens, intermediate]`` tensors autograd keeps.

``down(silu(gate) · up)``, differentiated op by op, keeps the gate's output (for SiLU's derivative), SiLU's
output and the up projection's output (for the product's), and the product itself (the input the LoRA
matrix A of ``down`` needs for its gradient): four tensors as wide as the MLP, more than half of what a
llama-style layer keeps for its backward pass. Here the product and the down projection with its LoRA update
are one autograd function that keeps only ``gate`` and ``up`` (and the rank-wide ``product · Aᵀ``) and
recomputes ``silu(gate)`` and the product in the backward pass: element-wise work, a few hundredths of the
products around it. The forward is the same sums as ``lora.py``'s fused layer, so its output is the same
bits; the gradients are the same maths, rounded in another order.

It applies to MLP classes whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with a
SiLU (llama, qwen2/3, mistral and their kin) and a fused LoRA ``down_proj`` over a frozen base, in float32 or
under autocast with base weights of autocast's dtype (bf16, the CUDA default; fp16 with loss scaling on older
GPUs: the same products in the same order as autograd's, so an overflow still reaches the scaler as inf), as
the fused layer allows; anything else keeps the model's own forward.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

import torch
import torch.nn.functional as F

SWIGLU_FORWARD = "returnself.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"


class SwiGLUDown(torch.autograd.Function):
    """``down(silu(gate) · up)`` where ``down`` is a frozen linear map plus a LoRA update ``s · (h Aᵀ) Bᵀ``."""

    @staticmethod
    def forward(
        ctx: Any,
        gate: torch.Tensor,
        up: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        product = (F.silu(gate) * up).reshape(-1, gate.shape[-1])
        out = F.linear(product, weight, bias)
        # under autocast (bf16 base and activations, fp32 adapter) the adapter's matrices are rounded to the
        # products' dtype, as in the fused LoRA layer; no-ops otherwise
        lora_a_cast, lora_b_cast = lora_a.to(out.dtype), lora_b.to(out.dtype)
        update = F.linear(product, lora_a_cast)
        out.addmm_(update, lora_b_cast.t(), alpha=scaling)
        ctx.save_for_backward(gate, up, weight, lora_a_cast, lora_b_cast, update)
        ctx.scaling = scaling
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)  # the gradients go back in the parameters' dtype
        return out.view(*gate.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable  # it keeps intermediates: no double backward through them
    def backward(ctx: Any, grad_out: torch.Tensor):
        gate, up, weight, lora_a, lora_b, update = ctx.saved_tensors
        scaling = ctx.scaling
        dtype_a, dtype_b = ctx.lora_dtypes
        # the backward pass runs outside autocast: every product here is in the activations' dtype, as autograd
        # would run the forward's bf16 products backwards; the adapter's gradients are then cast back, as the
        # backward of the forward's cast does
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(gate.dtype)
        grad_update = torch.mm(grad, lora_b).mul_(scaling)  # d/d(product · Aᵀ): rank-wide
        grad_lora_b = None
        if ctx.needs_input_grad[5]:
            grad_lora_b = torch.mm(grad.t(), update).mul_(scaling).to(dtype_b)
        silu = F.silu(gate)
        grad_lora_a = None
        if ctx.needs_input_grad[4]:
            grad_lora_a = torch.mm(grad_update.t(), (silu * up).reshape(-1, gate.shape[-1])).to(dtype_a)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):  # e.g. no adapter before this one
            return None, None, None, None, grad_lora_a, grad_lora_b, None
        grad_product = torch.mm(grad, weight).addmm_(grad_update, lora_a).view_as(gate)
        grad_up = grad_product * silu if ctx.needs_input_grad[1] else None
        del silu
        # SiLU's own backward kernel: grad · silu'(gate) in one pass
        grad_gate = torch.ops.aten.silu_backward(grad_product.mul_(up), gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, None, None, grad_lora_a, grad_lora_b, None


@functools.cache
def _forward_is_swiglu(mlp_class: type) -> bool:
    try:
        source = inspect.getsource(mlp_class.forward)
    except (OSError, TypeError):
        return False
    body = source.split(":", 1)[1] if "def forward(self, x)" in source else ""
    body = re.sub(r"#.*", "", body)
    body = re.sub(r"\s+", "", body)
    # the usual body, with or without a named intermediate
    return body in (SWIGLU_FORWARD, SWIGLU_FORWARD.replace("return", "down_proj=", 1) + "returndown_proj")


def _is_silu(module: Any) -> bool:
    return isinstance(module, torch.nn.SiLU) or type(module).__name__ == "SiLUActivation"


@functools.cache
def swiglu_class(mlp_class: type) -> type:
    """A subclass of the model's MLP class whose forward goes through ``SwiGLUDown`` where it can."""

    class SwiGLUMLP(mlp_class):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            parts = self.down_proj._fused_parts(x) if hasattr(self.down_proj, "_fused_parts") else None
            # under autocast, _fused_parts has checked that base, activations and autocast share one dtype
            if parts is None or not torch.is_grad_enabled():
                return super().forward(x)
            weight, bias, lora_a, lora_b, scaling = parts
            if weight.requires_grad or (bias is not None and bias.requires_grad):
                return super().forward(x)  # a trainable base (PEFT's bias="all"): its gradient is not formed here
            return SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), weight, bias, lora_a, lora_b, scaling)

    SwiGLUMLP.__name__ = SwiGLUMLP.__qualname__ = f"SwiGLU{mlp_class.__name__}"
    return SwiGLUMLP


def fuse_swiglu_blocks(model: torch.nn.Module) -> int:
    """Give every llama-style SwiGLU MLP in ``model`` the lean backward; returns how many blocks."""
    count = 0
    for module in model.modules():
        kind = type(module)
        if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        if not _is_silu(module.act_fn) or not _forward_is_swiglu(kind):
            continue
        module.__class__ = swiglu_class(kind)
        count += 1
    return count
