"""One benchmark measurement in a fresh process (so peak memory is this variant's alone); prints JSON."""

from __future__ import annotations

import argparse
import json
import statistics
import time

from bench import memory
from bench.workloads import WORKLOADS, Workload

# torch-<kernel>[-gc]: the chunked response-only kernel or full logits, with or without gradient checkpointing
VARIANTS = ["torch-chunked", "torch-naive", "torch-chunked-gc", "torch-naive-gc"]


def prepare(workload: Workload):
    from transformers import AutoTokenizer

    from core.data import load_preferences
    from core.tokenization import ChatTokenizer, tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(workload.tokenizer)
    pairs, _ = load_preferences(workload.data)
    chat = ChatTokenizer(tokenizer)
    tokenized, _ = tokenize_pairs(
        pairs[: workload.pairs], chat, max_length=workload.max_length, max_prompt_length=workload.max_prompt_length
    )
    return tokenizer, chat, tokenized


def run_torch(
    workload: Workload, steps: int, naive: bool, device: str, dtype: str, checkpointing: bool = False, seed: int = 0
) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from backends.torch_backend.backend import TorchBackend
    from core.batching import collate, plan_batches
    from core.config import LoraConfig
    from core.objectives import DPO
    from core.reference import compute_reference

    tokenizer, chat, tokenized = prepare(workload)
    config = AutoConfig.from_pretrained(workload.tokenizer)
    for key, value in workload.model_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    backend = TorchBackend(device=device, dtype=dtype, naive_logits=naive, gradient_checkpointing=checkpointing)
    backend.use_model(model, tokenizer, workload.name)
    backend.attach_lora(LoraConfig(rank=workload.lora_rank, alpha=workload.lora_alpha))
    backend.setup_optimizer(weight_decay=0.0)
    plan = plan_batches([p.length for p in tokenized], workload.batch_pairs, seed=seed)[: steps + 1]
    used = [tokenized[i] for batch in plan for i in batch]
    started = time.perf_counter()
    reference = compute_reference(backend, used, batch_size=workload.batch_pairs, pad_id=chat.pad_id, adapter=False)
    reference_seconds = time.perf_counter() - started
    objective = DPO(workload.beta)
    resident_before = memory.current_bytes()
    exact_peak = memory.reset_peak()
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, tokens, losses = [], [], []
    for index, rows in enumerate(plan):
        batch = collate([tokenized[i] for i in rows], chat.pad_id)
        if backend.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = backend.forward_backward(batch, objective, reference.for_batch(batch.pair_indices), 0.0, 1.0)
        backend.apply_gradients(workload.lr, 1.0)
        if backend.device.type == "cuda":
            torch.cuda.synchronize()
        if index > 0:  # the first step warms up allocators and kernels
            seconds.append(time.perf_counter() - started)
            tokens.append(batch.num_tokens)
        losses.append(result.metrics["loss"])
    figures = {
        "variant": f"torch-{'naive' if naive else 'chunked'}{'-gc' if checkpointing else ''}",
        "device": str(backend.device),
        "dtype": dtype,
        "steps": len(seconds),
        "seconds_per_step": statistics.median(seconds),
        "tokens_per_second": sum(tokens) / sum(seconds),
        "pairs_per_second": workload.batch_pairs / statistics.median(seconds),
        "reference_seconds": reference_seconds,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "resident_before_steps": resident_before,
        "peak_resident": memory.peak_bytes(),
        "peak_is_steps_only": exact_peak,
        "trainable_parameters": backend.trainable_parameters(),
        "total_parameters": backend.total_parameters(),
    }
    if backend.device.type == "cuda":
        figures["peak_device"] = float(torch.cuda.max_memory_allocated())
        figures["gpu"] = torch.cuda.get_device_name()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.workload]
    kernel = args.variant.split("-")[1]
    figures = run_torch(
        workload, args.steps, kernel == "naive", args.device, args.dtype, checkpointing=args.variant.endswith("-gc")
    )
    print("BENCH " + json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
