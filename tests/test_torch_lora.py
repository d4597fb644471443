"""The fused LoRA layer (backends/torch_backend/lora.py) against PEFT's own forward: outputs and gradients in
float64 (1e-12: the same sum, rounded in another order) and float32, and every case it leaves to PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear

from backends.torch_backend.lora import fuse_lora_layers
from tests.helpers import float64_throughout, tiny_causal_lm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(dtype: torch.dtype, dropout: float = 0.0, lora_bias: bool = False):
    model = tiny_causal_lm("llama", vocab=97, seed=0).to(dtype)
    if dtype == torch.float64:
        float64_throughout(model)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, lora_bias=lora_bias)
    peft = get_peft_model(model, config).to(dtype)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:  # non-zero (the bias too), so the update is not trivially 0
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.05)
    return peft


def loss_and_grads(model, input_ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids).logits
    loss = torch.log_softmax(logits.to(torch.float64), -1)[:, :-1].gather(2, input_ids[:, 1:, None]).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_the_fused_layer_equals_peft_forward_and_backward(dtype, tolerance) -> None:
    plain = lora_model(dtype)
    fused = copy.deepcopy(plain)
    assert fuse_lora_layers(fused) == 2 * len(TARGETS)  # the tiny model's 2 blocks
    assert all(type(m) is not PeftLoraLinear for m in fused.modules() if isinstance(m, PeftLoraLinear))
    input_ids = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(2))
    logits, grads = loss_and_grads(plain, input_ids)
    fused_logits, fused_grads = loss_and_grads(fused, input_ids)
    scale = logits.abs().max()
    assert (fused_logits - logits).abs().max() <= tolerance * scale
    assert grads.keys() == fused_grads.keys() and len(grads) == 4 * len(TARGETS)
    for name, grad in grads.items():
        assert (fused_grads[name] - grad).abs().max() <= tolerance * grad.abs().max(), name


def test_a_disabled_adapter_is_the_base_model_and_merging_still_works() -> None:
    model = lora_model(torch.float64)
    fuse_lora_layers(model)
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tuned = model(input_ids=input_ids).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
        merged = copy.deepcopy(model).merge_and_unload()(input_ids=input_ids).logits
        unfused = lora_model(torch.float64)
        with unfused.disable_adapter():
            reference_base = unfused(input_ids=input_ids).logits
    assert (tuned - base).abs().max() > 1e-3  # the adapter changes the output
    assert torch.equal(base, reference_base)  # off, it is exactly PEFT's base path
    assert (merged - tuned).abs().max() <= 1e-10 * tuned.abs().max()


@pytest.mark.parametrize("settings", [{"dropout": 0.1}, {"lora_bias": True}])
def test_what_the_fused_path_does_not_cover_goes_to_peft(settings) -> None:
    """Dropout (a random mask PEFT draws) and a bias on B (an adapter trained with PEFT's lora_bias): the same
    results as PEFT's, bit for bit."""
    plain = lora_model(torch.float64, **settings)
    fused = copy.deepcopy(plain)
    fuse_lora_layers(fused)
    input_ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    logits, grads = loss_and_grads(plain, input_ids)
    torch.manual_seed(5)
    fused_logits, fused_grads = loss_and_grads(fused, input_ids)
    assert torch.equal(fused_logits, logits)
    for name, grad in grads.items():
        assert torch.equal(fused_grads[name], grad), name


def test_under_bf16_autocast_the_fused_layer_is_peft_with_one_rounding_less(monkeypatch) -> None:
    """bf16 base, fp32 adapter, bf16 autocast (model.dtype=bfloat16): the products run in bf16 as PEFT's do;
    the update is added in the GEMM's fp32 accumulator and rounded once (PEFT rounds the scaled update, then
    the sum). So the two agree to a few bf16 units on the logits, and the gradients point the same way."""
    plain = lora_model(torch.float32).to(torch.bfloat16)
    for parameter in plain.parameters():  # as the backend keeps them: the adapter's master weights in fp32
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    fused = copy.deepcopy(plain)
    fuse_lora_layers(fused)
    peft_calls = []
    peft_forward = PeftLoraLinear.forward

    def counted(self, *args, **kwargs):
        peft_calls.append(type(self).__name__)
        return peft_forward(self, *args, **kwargs)

    monkeypatch.setattr(PeftLoraLinear, "forward", counted)
    input_ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, grads = loss_and_grads(plain, input_ids)
        assert len(peft_calls) == 2 * len(TARGETS)
        fused_logits, fused_grads = loss_and_grads(fused, input_ids)
    assert len(peft_calls) == 2 * len(TARGETS)  # the fused layers never fell back to PEFT's forward
    assert fused_logits.dtype == torch.bfloat16
    assert (fused_logits.float() - logits.float()).abs().max() <= 4 * 2.0**-8 * logits.float().abs().max()
    for name, grad in grads.items():
        assert fused_grads[name].dtype == torch.float32, name
        cosine = torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), grad.flatten(), dim=0)
        assert float(cosine) >= 0.99, name
