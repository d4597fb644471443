"""The torch backend against plain PyTorch: one DPO step's loss and LoRA gradients, PEFT round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backends.torch_backend.backend import TorchBackend, enable_checkpointing
from core.backend import BackendError
from core.batching import collate
from core.config import LoraConfig
from core.data import load_preferences
from core.objectives import DPO
from core.tokenization import ChatTokenizer, tokenize_pairs
from tests.helpers import DEMO_MODEL, metric_bounds, write_demo_subset


@pytest.fixture
def backend_and_batch(tmp_path):
    backend = TorchBackend(device="cpu")
    backend.load_model(str(DEMO_MODEL))
    backend.seed(0)
    backend.attach_lora(LoraConfig(rank=4, alpha=8))
    with torch.no_grad():  # non-zero B so the policy differs from the reference and every LoRA weight gets a gradient
        for name, parameter in backend.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    pairs, _ = load_preferences(write_demo_subset(tmp_path / "p.jsonl", count=6))
    chat = ChatTokenizer(backend.tokenizer)
    tokenized, _ = tokenize_pairs(pairs, chat, max_length=128)
    return backend, collate(tokenized, chat.pad_id)


def plain_dpo_loss(model, batch, beta: float) -> torch.Tensor:
    """DPO written the textbook way: full logits, log-softmax, masked sums, reference = adapter disabled."""
    input_ids = torch.from_numpy(batch.input_ids).long()
    attention_mask = torch.from_numpy(batch.attention_mask).long()
    mask = torch.from_numpy(batch.loss_mask[:, 1:]).float()

    def logps() -> torch.Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        token = torch.log_softmax(logits[:, :-1], -1).gather(2, input_ids[:, 1:, None]).squeeze(2)
        return (token * mask).sum(1)

    with torch.no_grad(), model.disable_adapter():
        reference = logps()
    policy = logps()
    pairs = batch.num_pairs
    logits = beta * ((policy[:pairs] - policy[pairs:]) - (reference[:pairs] - reference[pairs:]))
    return -F.logsigmoid(logits).mean()


def test_one_dpo_step_matches_plain_pytorch(backend_and_batch) -> None:
    backend, batch = backend_and_batch
    assert_step_matches_plain_pytorch(backend, batch, lora_tensors=4 * 7 * 2)  # 4 blocks × 7 projections × (A, B)


def assert_step_matches_plain_pytorch(backend, batch, lora_tensors: int) -> None:
    """One DPO step's loss and every LoRA gradient equal `plain_dpo_loss`'s (1e-5)."""
    backend.setup_optimizer(weight_decay=0.0)
    reference = backend.sequence_logps(batch, adapter=False)
    result = backend.forward_backward(batch, DPO(beta=0.1), reference, nll_weight=0.0, scale=1.0)
    ours = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.requires_grad}
    backend.discard_gradients()

    backend.model.train()
    loss = plain_dpo_loss(backend.model, batch, beta=0.1)
    loss.backward()
    plain = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.requires_grad}
    backend.discard_gradients()

    # the loss is β × differences of summed log-probs: its float32 rounding scales with those (metric_bounds)
    logps = np.concatenate([reference, backend.sequence_logps(batch)])
    assert result.metrics["loss"] == pytest.approx(float(loss), **metric_bounds("loss", 1e-5, 0.1, logps))
    assert set(ours) == set(plain) and len(ours) == lora_tensors
    for name, grad in plain.items():
        expected = grad.numpy()
        np.testing.assert_allclose(
            ours[name].numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(), err_msg=name
        )
        assert np.abs(expected).max() > 0


def test_the_step_updates_only_the_adapter(backend_and_batch) -> None:
    backend, batch = backend_and_batch
    backend.setup_optimizer(weight_decay=0.0)
    frozen = {n: p.detach().clone() for n, p in backend.model.named_parameters() if not p.requires_grad}
    before = backend.adapter_weights()
    backend.forward_backward(batch, DPO(beta=0.1), backend.sequence_logps(batch, adapter=False), 0.0, 1.0)
    update = backend.apply_gradients(lr=1e-3, max_grad_norm=1.0)
    assert update.applied and update.grad_norm > 0
    after = backend.adapter_weights()
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, frozen[n]) for n, p in backend.model.named_parameters() if not p.requires_grad)


def test_peft_export_reproduces_the_logits(backend_and_batch, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    backend, batch = backend_and_batch
    out = tmp_path / "adapter"
    out.mkdir()
    backend.save_adapter(out)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    input_ids = torch.from_numpy(batch.input_ids).long()
    attention_mask = torch.from_numpy(batch.attention_mask).long()
    backend.model.eval()
    with torch.no_grad():
        ours = backend.model(input_ids=input_ids, attention_mask=attention_mask).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL), out).eval()
        theirs = loaded(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    np.testing.assert_allclose(theirs[real].numpy(), ours[real].numpy(), rtol=1e-5, atol=1e-5)


def test_loading_an_adapter_that_does_not_fit_is_a_clear_error(backend_and_batch, tmp_path) -> None:
    backend, _ = backend_and_batch
    other = TorchBackend(device="cpu")
    other.load_model(str(DEMO_MODEL))
    other.attach_lora(LoraConfig(rank=8, alpha=16))
    folder = tmp_path / "rank8"
    folder.mkdir()
    other.save_adapter(folder)
    with pytest.raises(
        BackendError,
        match=r"does not fit this model and LoRA settings: .*lora_A.weight has shape "
        r"\(8, \d+\), this model needs \(4, \d+\)",
    ):
        backend.load_adapter(folder)
    with pytest.raises(BackendError, match=r"no adapter_model\.safetensors"):
        backend.load_adapter(tmp_path)


def test_generation_with_the_adapter_on_and_off(backend_and_batch) -> None:
    backend, _ = backend_and_batch
    with torch.no_grad():  # an adapter large enough to change what greedy decoding picks
        for name, parameter in backend.model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)
    chat = ChatTokenizer(backend.tokenizer)
    prompt = chat.prompt_ids([{"role": "user", "content": "Name a color."}])
    on = backend.generate([prompt], max_new_tokens=12, adapter=True, stop_ids=chat.stop_ids, pad_id=chat.pad_id)
    off = backend.generate([prompt], max_new_tokens=12, adapter=False, stop_ids=chat.stop_ids, pad_id=chat.pad_id)
    again = backend.generate([prompt], max_new_tokens=12, adapter=False, stop_ids=chat.stop_ids, pad_id=chat.pad_id)
    assert off == again and on != off
    assert chat.decode(off[0]).startswith("Oh")  # the SFT model rambles
    state = torch.get_rng_state()
    backend.generate([prompt], max_new_tokens=4, temperature=1.0, seed=3, stop_ids=chat.stop_ids)
    assert torch.equal(state, torch.get_rng_state())  # sampling leaves the training RNG alone


def test_gradient_accumulation_equals_one_big_batch(backend_and_batch, tmp_path) -> None:
    """Two half batches scaled by their share of the pairs give the full batch's gradient."""
    backend, batch = backend_and_batch
    reference = backend.sequence_logps(batch, adapter=False)
    backend.forward_backward(batch, DPO(beta=0.1), reference, 0.0, 1.0)
    whole = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.requires_grad}
    backend.model.zero_grad(set_to_none=True)
    pairs, _ = load_preferences(write_demo_subset(tmp_path / "q.jsonl", count=6))
    chat = ChatTokenizer(backend.tokenizer)
    tokenized, _ = tokenize_pairs(pairs, chat, max_length=128)
    for part in (tokenized[:2], tokenized[2:]):
        half = collate(part, chat.pad_id)
        ref = np.concatenate([reference[:6][half.pair_indices], reference[6:][half.pair_indices]])
        backend.forward_backward(half, DPO(beta=0.1), ref, 0.0, scale=half.num_pairs / 6)
    for name, parameter in backend.model.named_parameters():
        if parameter.requires_grad:
            expected = whole[name].numpy()
            np.testing.assert_allclose(
                parameter.grad.numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(), err_msg=name
            )


def test_gradient_checkpointing_changes_memory_not_results(backend_and_batch) -> None:
    backend, batch = backend_and_batch
    reference = backend.sequence_logps(batch, adapter=False)
    plain = backend.forward_backward(batch, DPO(beta=0.1), reference, 0.0, 1.0)
    grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.requires_grad}
    backend.model.zero_grad(set_to_none=True)
    enable_checkpointing(backend.model.get_base_model())
    checkpointed = backend.forward_backward(batch, DPO(beta=0.1), reference, 0.0, 1.0)
    assert checkpointed.metrics["loss"] == pytest.approx(plain.metrics["loss"], rel=1e-6)
    for name, parameter in backend.model.named_parameters():
        if parameter.requires_grad:
            np.testing.assert_allclose(
                parameter.grad.numpy(),
                grads[name].numpy(),
                rtol=1e-5,
                atol=1e-5 * np.abs(grads[name].numpy()).max(),
                err_msg=name,
            )


def test_non_finite_gradients_are_not_applied(backend_and_batch) -> None:
    backend, batch = backend_and_batch
    backend.setup_optimizer(weight_decay=0.0)
    before = backend.adapter_weights()
    backend.forward_backward(batch, DPO(beta=0.1), backend.sequence_logps(batch, adapter=False), 0.0, 1.0)
    next(p for p in backend.model.parameters() if p.requires_grad).grad[0, 0] = float("nan")
    update = backend.apply_gradients(lr=1e-2, max_grad_norm=1.0)
    assert not update.applied and not np.isfinite(update.grad_norm)
    after = backend.adapter_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in backend.model.parameters())


def test_bf16_on_the_cpu_runs_under_autocast_and_stays_close_to_float32(tmp_path) -> None:
    """model.dtype=bfloat16 on a CPU (fast where it has AMX or AVX512-BF16): the base in bf16, the LoRA weights
    and their gradients in fp32, the products under bf16 autocast. A bf16 model is another model (every weight
    rounded to 8 bits), so against float32 only plausibility holds, with test_cuda.py's bf16 tolerances:
    log-probs within 2e-2, the loss within what the log-prob differences allow, gradients the same way."""
    from tests.test_cuda import assert_bf16_step_is_close, demo_backend, demo_batch, dpo_step

    cpu = demo_backend("cpu", "float32")
    batch = demo_batch(tmp_path, cpu.tokenizer)
    fp32_step = dpo_step(cpu, batch)
    bf16 = demo_backend("cpu", "bfloat16", lora_from=cpu)
    trainable = [p for p in bf16.model.parameters() if p.requires_grad]
    base = [p for n, p in bf16.model.named_parameters() if n.endswith("base_layer.weight")]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert base and all(p.dtype == torch.bfloat16 for p in base)
    produced: list[tuple[bool, torch.dtype]] = []
    layer = next(m for n, m in bf16.model.named_modules() if n.endswith("q_proj"))
    handle = layer.register_forward_hook(
        lambda module, args, output: produced.append((torch.is_autocast_enabled("cpu"), output.dtype))
    )
    try:
        bf16_step = dpo_step(bf16, batch)
    finally:
        handle.remove()
    assert produced and set(produced) == {(True, torch.bfloat16)}  # every LoRA layer ran under bf16 autocast
    assert_bf16_step_is_close(bf16_step, fp32_step, batch.num_pairs)
    assert all(p.grad.dtype == torch.float32 for p in trainable)


def test_one_adapter_is_one_file_whatever_the_string_hashing(tmp_path: Path) -> None:
    """PEFT writes target_modules from a set, whose order follows Python's per-process string hashing: two
    processes saving the same adapter wrote different adapter_config.json files, so a reference cache keyed on
    the adapter's content missed (seen in the second run of models/smollm2/rounds.yaml). Sorted, they match."""
    import subprocess
    import sys

    from core.fingerprint import folder_fingerprint

    script = (
        "import sys, torch; from backends.torch_backend.backend import TorchBackend; "
        "from core.config import LoraConfig; torch.manual_seed(0); "
        "b = TorchBackend(device='cpu', dtype='float32'); b.load_model(sys.argv[1]); b.seed(0); "
        "b.attach_lora(LoraConfig(rank=4, alpha=8)); b.save_adapter(__import__('pathlib').Path(sys.argv[2]))"
    )
    folders = []
    for seed in ("1", "2", "3"):
        folder = tmp_path / f"hash-{seed}"
        folder.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-c", script, str(DEMO_MODEL), str(folder)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=Path(__file__).parents[1],
        )
        assert done.returncode == 0, done.stderr[-2000:]
        folders.append(folder)
    configs = [(folder / "adapter_config.json").read_bytes() for folder in folders]
    modules = json.loads(configs[0])["target_modules"]
    assert len(modules) > 1 and modules == sorted(modules)
    assert configs[0] == configs[1] == configs[2]
    assert len({folder_fingerprint(folder) for folder in folders}) == 1
