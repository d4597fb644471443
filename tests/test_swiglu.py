"""The SwiGLU block with the lean backward (backends/torch_backend/mlp.py): its gradients against autograd's
(float64 gradcheck, and a whole LoRA model against PEFT's own forward to 1e-12 in float64 and 2e-5 in
float32), the same forward bits as the fused LoRA layer alone, half the wide tensors kept for the backward
pass, and the MLPs and cases it leaves alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from backends.torch_backend.lora import fuse_lora_layers
from backends.torch_backend.mlp import SwiGLUDown, _forward_is_swiglu, fuse_swiglu_blocks
from tests.helpers import float64_throughout
from tests.test_torch_lora import TARGETS, lora_model, loss_and_grads


@pytest.mark.parametrize("inputs_need_grad", [True, False], ids=["all", "adapter-only"])
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_against_autograd(bias: bool, inputs_need_grad: bool) -> None:
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)

    gate, up = tensor(2, 5, 12, grad=inputs_need_grad), tensor(2, 5, 12, grad=inputs_need_grad)
    weight, lora_a, lora_b = tensor(7, 12, grad=False), tensor(3, 12), tensor(7, 3)
    offset = tensor(7, grad=False) if bias else None
    assert torch.autograd.gradcheck(
        lambda g, u, a, b: SwiGLUDown.apply(g, u, weight, offset, a, b, 0.5), (gate, up, lora_a, lora_b)
    )
    if not inputs_need_grad:  # only the adapter's gradients (the first adapted layer of a down_proj-only LoRA)
        out = SwiGLUDown.apply(gate, up, weight, offset, lora_a, lora_b, 0.5)
        grads = torch.autograd.grad(out.sum(), (lora_a, lora_b))
        product = F.silu(gate) * up
        plain = F.linear(product, weight, offset) + 0.5 * F.linear(product, lora_a) @ lora_b.t()
        reference = torch.autograd.grad(plain.sum(), (lora_a, lora_b))
        for got, expected in zip(grads, reference, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_a_model_with_lean_swiglu_equals_peft(dtype, tolerance) -> None:
    check_equals_peft(dtype, tolerance, "cpu")


def check_equals_peft(dtype: torch.dtype, tolerance: float, device: str) -> None:
    plain = lora_model(dtype).to(device)
    lora_only = copy.deepcopy(plain)
    fuse_lora_layers(lora_only)
    fused = copy.deepcopy(lora_only)
    assert fuse_swiglu_blocks(fused) == 2  # the tiny model's 2 blocks
    input_ids = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(2)).to(device)
    logits, grads = loss_and_grads(plain, input_ids)
    fused_logits, fused_grads = loss_and_grads(fused, input_ids)
    # the forward is the fused LoRA layer's own sums: the same bits
    assert torch.equal(fused_logits, loss_and_grads(lora_only, input_ids)[0])
    assert (fused_logits - logits).abs().max() <= tolerance * logits.abs().max()
    assert grads.keys() == fused_grads.keys() and len(grads) == 4 * len(TARGETS)
    for name, grad in grads.items():
        assert (fused_grads[name] - grad).abs().max() <= tolerance * grad.abs().max(), name


def wide_bytes_kept(mlp: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the [tokens, intermediate]-wide tensors autograd keeps for the MLP's backward pass."""
    kept: dict[int, int] = {}
    width = mlp.gate_proj.base_layer.out_features

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape[-1] == width and tensor.numel() == x.shape[0] * x.shape[1] * width:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        mlp(x)
    return sum(kept.values())


def test_half_the_wide_tensors_are_kept() -> None:
    lora_only = lora_model(torch.float32)
    fuse_lora_layers(lora_only)
    fused = copy.deepcopy(lora_only)
    fuse_swiglu_blocks(fused)
    x = torch.randn(2, 9, lora_only.base_model.model.config.hidden_size, requires_grad=True)
    mlp = lambda model: model.base_model.model.model.layers[0].mlp  # noqa: E731
    before, after = wide_bytes_kept(mlp(lora_only), x), wide_bytes_kept(mlp(fused), x)
    one = 2 * 9 * mlp(fused).gate_proj.base_layer.out_features * 4
    assert (before, after) == (4 * one, 2 * one)


def test_what_it_leaves_alone(monkeypatch) -> None:
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.mistral.modeling_mistral import MistralMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    assert all(_forward_is_swiglu(kind) for kind in (LlamaMLP, Qwen2MLP, MistralMLP))

    class ClampedMLP(LlamaMLP):  # another body: not recognised
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)).clamp(max=7) * self.up_proj(x))

    assert not _forward_is_swiglu(ClampedMLP)
    model = lora_model(torch.float64)
    fuse_lora_layers(model)
    fuse_swiglu_blocks(model)
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(1, 4, model.base_model.model.config.hidden_size, dtype=torch.float64)
    plain = LlamaMLP.forward
    calls: list[int] = []
    apply = SwiGLUDown.apply

    def counted(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(SwiGLUDown, "apply", counted)
    mlp(x.requires_grad_(True))
    assert calls == [1]  # the lean path, where it applies
    # no gradient, a disabled adapter: the model's own forward, the same bits
    with torch.no_grad():
        assert torch.equal(mlp(x), plain(mlp, x))
    with model.disable_adapter():
        assert torch.equal(mlp(x), plain(mlp, x))
    # a trainable base (PEFT's bias="all" makes biases trainable): its gradient must be formed, so autograd's path
    mlp.down_proj.base_layer.weight.requires_grad_(True)
    mlp(x).sum().backward()
    assert mlp.down_proj.base_layer.weight.grad is not None
    assert calls == [1]
    other = lora_model(torch.float64)
    fuse_lora_layers(other)
    other.base_model.model.model.layers[1].mlp.act_fn = torch.nn.GELU()  # not SiLU: left alone
    assert fuse_swiglu_blocks(other) == 1


def test_under_bf16_autocast_it_is_as_accurate_as_autograd() -> None:
    check_bf16_autocast("cpu")


def check_bf16_autocast(device: str) -> None:
    """bf16 base, fp32 adapter, bf16 autocast (the CUDA default, model.dtype=bfloat16 on a CPU): the forward is
    the fused layer's bf16 sums, the same bits; the backward runs its products in bf16 as autograd would, in
    another order. Both are held to the float64 gradients of the same (bf16-rounded) weights: within 4 bf16
    units of each tensor's largest entry, and the lean path no less accurate on the whole (its summed error
    at most 1.25× autograd's; five seeds gave 1.01-1.09×)."""
    plain = lora_model(torch.float32).to(torch.bfloat16)
    for parameter in plain.parameters():  # as the backend keeps them: the adapter's master weights in fp32
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    exact = copy.deepcopy(plain).to(torch.float64)
    float64_throughout(exact)
    autograd = copy.deepcopy(plain).to(device)
    fuse_lora_layers(autograd)
    lean = copy.deepcopy(autograd)
    assert fuse_swiglu_blocks(lean) == 2
    input_ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(4))
    _, exact_grads = loss_and_grads(exact, input_ids)
    input_ids = input_ids.to(device)

    def under_autocast(model):  # the forward under autocast, the backward outside it, as the backend runs them
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(input_ids=input_ids).logits
        loss = torch.log_softmax(logits.to(torch.float64), -1)[:, :-1].gather(2, input_ids[:, 1:, None]).mean()
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    logits, grads = under_autocast(autograd)
    lean_mlp = lean.base_model.model.model.layers[0].mlp
    x = torch.randn(1, 5, lean.base_model.model.config.hidden_size, dtype=torch.bfloat16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        kept = wide_bytes_kept(lean_mlp, x.requires_grad_(True))
    assert kept == 2 * 5 * lean_mlp.gate_proj.base_layer.out_features * 2  # gate and up, in bf16
    apply, calls = SwiGLUDown.apply, []
    SwiGLUDown.apply = lambda *args: calls.append(1) or apply(*args)  # the whole model takes the lean path too
    try:
        lean_logits, lean_grads = under_autocast(lean)
    finally:
        SwiGLUDown.apply = apply
    assert len(calls) == 2  # both blocks
    assert lean_logits.dtype == torch.bfloat16 and torch.equal(lean_logits, logits)
    errors, lean_errors = [], []
    for name, expected in exact_grads.items():
        assert lean_grads[name].dtype == torch.float32, name
        scale = expected.abs().max()
        errors.append(float((grads[name].double().cpu() - expected).abs().max() / scale))
        lean_errors.append(float((lean_grads[name].double().cpu() - expected).abs().max() / scale))
        assert lean_errors[-1] <= 4 * 2.0**-8 and errors[-1] <= 4 * 2.0**-8, name
    assert sum(lean_errors) <= 1.25 * sum(errors)
