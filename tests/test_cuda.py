"""The CUDA path, checked against the CPU's float32 results: the kernel, a DPO step, bf16 autocast with fp32
LoRA weights, the NCCL/DDP path, resume exactness and export. Every test is skipped where torch sees no GPU;
scripts/cuda_check.sh runs them on a lent GPU machine.

Tolerances, and why:

- float32 on CUDA against float32 (CPU, or the full-logits path): the same sums in another order. TF32 is
  turned off (``float32_matmul_precision("highest")``, torch's default, set explicitly), so every product is
  a true float32 one. Log-probs: 1e-5 relative (a few dozen terms, each rounded at ~6e-8). Gradients: 1e-4
  relative plus 1e-4 of the tensor's largest entry: CUDA sums some of them with atomic adds (``index_add``,
  scatter) in no fixed order, and entries with heavy cancellation differ by summation order alone.
- bf16 kernel against bf16 full logits (same bf16 model, same autocast): the decoder is the same computation;
  only the LM head's bf16 product can round a logit differently (another GEMM shape, another algorithm), by at
  most one bf16 unit, 2⁻⁸ of the largest |logit|. A token's log-prob moves by at most twice that (its logit and
  the log-sum-exp), a row's sum by that times its reply tokens: the bound is computed per row, worst case.
  Gradients: a handful of bf16 roundings (8 significant bits, ~0.4% each) on the way back: 3e-2 of the norm.
- a bf16 DPO step against the CPU float32 one: a bf16 model is a different model (every weight rounded to 8
  bits), so only plausibility holds: log-probs within 2e-2 relative, the loss within what the measured
  log-prob differences allow (|d loss| ≤ β × the largest change of a pair's four log-probs, since
  -log σ has slope below 1), gradients pointing the same way (cosine ≥ 0.98, 1e-1 of the norm overall).
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none here"),
]

from backends.torch_backend.backend import TorchBackend  # noqa: E402
from backends.torch_backend.distributed import TorchCollective  # noqa: E402
from backends.torch_backend.kernel import logit_transform, masked_sequence_logps, naive_sequence_logps  # noqa: E402
from core.batching import collate  # noqa: E402
from core.config import LoraConfig  # noqa: E402
from core.data import load_preferences  # noqa: E402
from core.objectives import DPO  # noqa: E402
from core.tokenization import ChatTokenizer, tokenize_pairs  # noqa: E402
from tests.helpers import DEMO_MODEL, metric_bounds, random_batch, tiny_causal_lm, write_demo_subset  # noqa: E402

RTOL_LOGPS_FP32 = 1e-5
RTOL_GRADS_FP32 = 1e-4
BF16_UNIT = 2.0**-8  # one unit in the last place of a bf16 number in [1, 2)
BETA = 0.1


@pytest.fixture(autouse=True)
def true_float32():
    """No TF32: float32 products on CUDA are real float32 ones, so float32 tolerances mean what they say."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours.double() - expected.double()).norm() / expected.double().norm())


# -- the kernel ----------------------------------------------------------------------------------------------


def kernel_and_naive(model: torch.nn.Module, dtype: torch.dtype, chunk_size: int):
    """(kernel log-probs, naive log-probs, their gradients, the largest |logit|, reply tokens per row) on CUDA."""
    model = model.to("cuda")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    batch = random_batch(97, rows=6, seed=3)
    input_ids, attention_mask, loss_mask = (
        torch.from_numpy(a).long().cuda() for a in (batch.input_ids, batch.attention_mask, batch.loss_mask)
    )
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        naive = naive_sequence_logps(model, input_ids, attention_mask, loss_mask)
    naive.sum().backward()
    naive_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with autocast:
        fast = masked_sequence_logps(
            model.get_decoder(),
            model.get_output_embeddings(),
            input_ids,
            attention_mask,
            loss_mask,
            chunk_size,
            logit_transform(model.config),
        )
    fast.sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad(), autocast:
        largest_logit = float(model(input_ids=input_ids, attention_mask=attention_mask).logits.float().abs().max())
    tokens = loss_mask[:, 1:].sum(1).double().cpu()
    return fast.detach(), naive.detach(), fast_grads, naive_grads, largest_logit, tokens


@pytest.mark.parametrize("chunk_size", [7, 1024])
@pytest.mark.parametrize(("kind", "tie"), [("llama", True), ("qwen2", False)], ids=["llama-tied", "qwen2-untied"])
def test_kernel_matches_full_logits_in_float32(kind: str, tie: bool, chunk_size: int) -> None:
    fast, naive, fast_grads, naive_grads, _, _ = kernel_and_naive(
        tiny_causal_lm(kind, tie=tie), torch.float32, chunk_size
    )
    assert fast.dtype == naive.dtype == torch.float32 and fast.is_cuda
    np.testing.assert_allclose(fast.cpu().numpy(), naive.cpu().numpy(), rtol=RTOL_LOGPS_FP32)
    for name, expected in naive_grads.items():
        want = expected.cpu().numpy()
        np.testing.assert_allclose(
            fast_grads[name].cpu().numpy(),
            want,
            rtol=RTOL_GRADS_FP32,
            atol=RTOL_GRADS_FP32 * np.abs(want).max(),
            err_msg=name,
        )


@pytest.mark.parametrize("chunk_size", [7, 1024])
@pytest.mark.parametrize(("kind", "tie"), [("llama", True), ("qwen2", False)], ids=["llama-tied", "qwen2-untied"])
def test_kernel_matches_full_logits_in_bf16(kind: str, tie: bool, chunk_size: int) -> None:
    model = tiny_causal_lm(kind, tie=tie).to(torch.bfloat16)
    fast, naive, fast_grads, naive_grads, largest, tokens = kernel_and_naive(model, torch.bfloat16, chunk_size)
    assert fast.dtype == naive.dtype == torch.float32  # accumulated in float32 whatever the model's dtype
    bound = 2 * BF16_UNIT * largest * tokens  # per row: every reply token's log-prob off by at most 2 units
    difference = (fast.double().cpu() - naive.double().cpu()).abs()
    assert bool((difference <= bound + 1e-6).all()), f"differences {difference.tolist()} over bounds {bound.tolist()}"
    assert bool((fast < 0).all())
    for name, expected in naive_grads.items():
        if expected.abs().max() > 0:
            assert relative_error(fast_grads[name], expected) <= 3e-2, name


# -- one DPO step against the CPU ----------------------------------------------------------------------------


def demo_batch(tmp_path: Path, tokenizer):
    pairs, _ = load_preferences(write_demo_subset(tmp_path / "p.jsonl", count=6))
    chat = ChatTokenizer(tokenizer)
    tokenized, _ = tokenize_pairs(pairs, chat, max_length=128)
    return collate(tokenized, chat.pad_id)


def demo_backend(device: str, dtype: str, lora_from: TorchBackend | None = None, **options) -> TorchBackend:
    """The demo model with LoRA r4; B non-zero (so every LoRA weight gets a gradient). A CUDA backend takes the
    CPU backend's LoRA weights: CUDA's random numbers differ from the CPU's."""
    backend = TorchBackend(device=device, dtype=dtype, **options)
    backend.load_model(str(DEMO_MODEL))
    backend.seed(0)
    backend.attach_lora(LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        if lora_from is None:
            for name, parameter in backend.model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
        else:
            source = dict(lora_from.model.named_parameters())
            for name, parameter in backend.model.named_parameters():
                if parameter.requires_grad:
                    parameter.copy_(source[name].detach().to(parameter.device, parameter.dtype))
    return backend


def dpo_step(backend: TorchBackend, batch):
    """(reference log-probs, policy log-probs, the step's loss, the LoRA gradients on the CPU in float64)."""
    backend.setup_optimizer(weight_decay=0.0)
    reference = backend.sequence_logps(batch, adapter=False)
    policy = backend.sequence_logps(batch)
    result = backend.forward_backward(batch, DPO(beta=BETA), reference, nll_weight=0.0, scale=1.0)
    grads = {n: p.grad.detach().double().cpu() for n, p in backend.model.named_parameters() if p.requires_grad}
    return reference, policy, result.metrics["loss"], grads


@pytest.fixture(scope="module")
def cpu_step(tmp_path_factory):
    cpu = demo_backend("cpu", "float32")
    batch = demo_batch(tmp_path_factory.mktemp("batch"), cpu.tokenizer)
    return cpu, batch, dpo_step(cpu, batch)


def test_dpo_step_in_float32_on_cuda_matches_the_cpu(cpu_step) -> None:
    cpu, batch, (reference, policy, loss, grads) = cpu_step
    cuda = demo_backend("cuda", "float32", lora_from=cpu)
    assert cuda.optimizer is None and cuda.device.type == "cuda"
    cuda_reference, cuda_policy, cuda_loss, cuda_grads = dpo_step(cuda, batch)
    assert cuda.optimizer.param_groups[0]["fused"]  # the fused AdamW, CUDA only
    np.testing.assert_allclose(cuda_reference, reference, rtol=RTOL_LOGPS_FP32)
    np.testing.assert_allclose(cuda_policy, policy, rtol=RTOL_LOGPS_FP32)
    logps = np.concatenate([reference, policy])
    assert cuda_loss == pytest.approx(loss, **metric_bounds("loss", RTOL_LOGPS_FP32, BETA, logps))
    assert set(cuda_grads) == set(grads) and len(grads) == 4 * 7 * 2
    for name, expected in grads.items():
        want = expected.numpy()
        assert np.abs(want).max() > 0, name
        np.testing.assert_allclose(
            cuda_grads[name].numpy(),
            want,
            rtol=RTOL_GRADS_FP32,
            atol=RTOL_GRADS_FP32 * np.abs(want).max(),
            err_msg=name,
        )


def assert_bf16_step_is_close(bf16_step, fp32_step, pairs: int) -> None:
    """A bf16 DPO step against the float32 one, with the module docstring's bf16 tolerances (also used by
    test_torch_backend.py for bf16 on the CPU)."""
    (bf16_reference, bf16_policy, bf16_loss, bf16_grads), (reference, policy, loss, grads) = bf16_step, fp32_step
    np.testing.assert_allclose(bf16_reference, reference, rtol=2e-2)
    np.testing.assert_allclose(bf16_policy, policy, rtol=2e-2)
    moved = np.abs(bf16_reference - reference) + np.abs(bf16_policy - policy)
    per_pair = moved[:pairs] + moved[pairs:]  # chosen and rejected, policy and reference
    assert abs(bf16_loss - loss) <= BETA * per_pair.max() + 1e-6
    everything = torch.cat([g.flatten() for g in grads.values()])
    ours = torch.cat([bf16_grads[n].flatten() for n in grads])
    assert relative_error(ours, everything) <= 1e-1
    for name, expected in grads.items():
        cosine = torch.nn.functional.cosine_similarity(bf16_grads[name].flatten(), expected.flatten(), dim=0)
        assert float(cosine) >= 0.98, name


def test_dpo_step_in_bf16_on_cuda_is_close_to_the_cpu(cpu_step) -> None:
    cpu, batch, fp32_step = cpu_step
    cuda = demo_backend("cuda", "bfloat16", lora_from=cpu)
    assert_bf16_step_is_close(dpo_step(cuda, batch), fp32_step, batch.num_pairs)


def test_bf16_autocast_keeps_the_lora_weights_in_float32(cpu_step) -> None:
    cpu, batch, _ = cpu_step
    cuda = demo_backend("cuda", "auto", lora_from=cpu)
    assert cuda.dtype == torch.bfloat16  # auto on a GPU with native bf16 (Ampere and later)
    trainable = [(n, p) for n, p in cuda.model.named_parameters() if p.requires_grad]
    frozen = [(n, p) for n, p in cuda.model.named_parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.is_cuda for _, p in trainable)
    base_weights = [p for n, p in frozen if n.endswith("base_layer.weight")]
    assert base_weights and all(p.dtype == torch.bfloat16 for p in base_weights), "the base should be bf16"
    produced: list[tuple[torch.dtype, bool]] = []
    # each adapted projection's output dtype, and whether autocast was on (the fused LoRA layer reads the
    # lora_A weight itself, so a hook on the lora_A module would never run)
    layer = next(m for n, m in cuda.model.named_modules() if n.endswith("q_proj"))
    handle = layer.register_forward_hook(
        lambda module, args, output: produced.append((output.dtype, torch.is_autocast_enabled("cuda")))
    )
    try:
        cuda.setup_optimizer(weight_decay=0.0)
        reference = cuda.sequence_logps(batch, adapter=False)
        before = {n: p.detach().clone() for n, p in trainable}
        cuda.forward_backward(batch, DPO(beta=BETA), reference, 0.0, 1.0)
    finally:
        handle.remove()
    assert produced and set(produced) == {(torch.bfloat16, True)}  # the matmuls ran under bf16 autocast
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in trainable)
    assert cuda.scaler is None  # bf16 needs no loss scaling
    update = cuda.apply_gradients(lr=1e-3, max_grad_norm=1.0)
    assert update.applied and np.isfinite(update.grad_norm) and update.grad_norm > 0
    assert all(p.dtype == torch.float32 for _, p in trainable)
    assert all(not torch.equal(p, before[n]) for n, p in trainable)


def test_the_nccl_path_on_one_gpu_equals_the_plain_step(cpu_step, monkeypatch) -> None:
    import torch.distributed as dist

    cpu, batch, _ = cpu_step
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        # one process that still takes the torchrun code path (DDP, NCCL collectives)
        collective = TorchCollective(0, 1, 0, torch.device("cuda:0"), launched=True)
        assert collective.sum(np.array([1.5, 2.0])).tolist() == [1.5, 2.0]
        assert collective.gather(np.array([[1.0, 2.0]])).tolist() == [[1.0, 2.0]]
        ddp = demo_backend("cuda:0", "float32", lora_from=cpu, collective=collective)
        assert ddp._ddp is not None
        plain = demo_backend("cuda", "float32", lora_from=cpu)
        _, _, ddp_loss, ddp_grads = dpo_step(ddp, batch)
        _, _, plain_loss, plain_grads = dpo_step(plain, batch)
    finally:
        dist.destroy_process_group()
    assert ddp_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, expected in plain_grads.items():
        want = expected.numpy()
        np.testing.assert_allclose(ddp_grads[name].numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# -- runs: resume exactness, export --------------------------------------------------------------------------

# float32: resuming restores the CUDA RNG (LoRA dropout), the fused AdamW's state and the data order; what is
# left is CUDA's unordered atomic sums, float32 rounding that can differ between any two runs: 1e-5, not 1e-6.
RESUME_TOLERANCE = 1e-5


def cuda_config(folder: Path) -> Path:
    import yaml

    from tests.faults.support import write_config

    path = write_config(folder)
    config = yaml.safe_load(path.read_text())
    config["model"].update(device="cuda", dtype="float32")
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    from tests.faults.support import duet

    folder = tmp_path_factory.mktemp("cuda-baseline")
    result = duet("--config", str(cuda_config(folder)))
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-2000:]
    return folder


def test_a_cuda_run_killed_and_resumed_equals_the_uninterrupted_one(uninterrupted: Path, tmp_path: Path) -> None:
    from core.metrics import read_metrics
    from tests.faults.support import assert_intact, assert_same_run, duet, run_dir

    config = cuda_config(tmp_path)
    killed = duet("--config", str(config), fault="step.updated:5")
    assert killed.returncode == -signal.SIGKILL, f"the fault never fired: {killed.stdout[-1500:]}"
    assert_intact(tmp_path)
    resumed = duet("--resume", str(run_dir(tmp_path)))
    assert resumed.returncode == 0, resumed.stdout[-1500:] + resumed.stderr[-2000:]
    assert_same_run(tmp_path, uninterrupted, tolerance=RESUME_TOLERANCE)
    start = next(e for e in read_metrics(run_dir(uninterrupted) / "metrics.jsonl") if e["type"] == "start")
    assert start["device"].startswith("cuda") and start["dtype"] == "float32", start


def test_an_export_from_a_cuda_run_loads_on_the_cpu(uninterrupted: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.export import export
    from tests.faults.support import run_dir

    out = export(run_dir(uninterrupted), "peft", tmp_path / "peft")
    cpu_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL), out).eval()
    assert all(p.device.type == "cpu" for p in cpu_model.parameters())
    cuda = TorchBackend(device="cuda", dtype="float32")
    cuda.load_model(str(DEMO_MODEL))
    cuda.attach_lora(LoraConfig(rank=4, alpha=8), adapter_path=str(out))
    batch = demo_batch(tmp_path, cuda.tokenizer)
    mask = torch.from_numpy(batch.loss_mask).long()
    with torch.no_grad():
        on_cpu = naive_sequence_logps(
            cpu_model, torch.from_numpy(batch.input_ids).long(), torch.from_numpy(batch.attention_mask).long(), mask
        )
    np.testing.assert_allclose(cuda.sequence_logps(batch), on_cpu.double().numpy(), rtol=RTOL_LOGPS_FP32)
    with torch.no_grad(), cpu_model.disable_adapter():
        base = naive_sequence_logps(
            cpu_model, torch.from_numpy(batch.input_ids).long(), torch.from_numpy(batch.attention_mask).long(), mask
        )
    assert not torch.allclose(base, on_cpu), "the exported adapter changes nothing: was anything trained?"


def test_the_lean_swiglu_backward_on_cuda() -> None:
    """backends/torch_backend/mlp.py on the GPU: in float32 against PEFT (TF32 off; 1e-4 of each tensor's
    largest entry, the float32 gradient tolerance above), and under bf16 autocast, the CUDA default, as
    accurate as autograd's own bf16 backward (tests/test_swiglu.py states that bound)."""
    from tests.test_swiglu import check_bf16_autocast, check_equals_peft

    check_equals_peft(torch.float32, RTOL_GRADS_FP32, "cuda")
    check_bf16_autocast("cuda")
