"""One benchmark measurement in a fresh process (so peak memory is this variant's alone); prints JSON.

Every variant loads the same weights: a workload's random-init model is built once (seed 0) and saved
under the cache, so torch and MLX start from identical parameters and their first losses compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench import memory
from bench.workloads import WORKLOADS, Workload

# torch-<kernel>[-gc]: the chunked response-only kernel or full logits, with or without gradient checkpointing;
# mlx: the MLX backend (its chunked kernel, compiled step)
VARIANTS = ["torch-chunked", "torch-naive", "torch-chunked-gc", "torch-naive-gc", "mlx", "mlx-gc"]


def model_folder(workload: Workload) -> Path:
    """The workload's model: the demo model, or a random-init model of the workload's shape saved once."""
    if workload.model is not None:
        return workload.model
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.atomic import atomic_directory
    from core.fingerprint import cache_root

    folder = cache_root() / "bench" / workload.name
    if (folder / "config.json").is_file():
        return folder
    # built from the dictionary, so derived fields (per-layer attention types) follow the new layer count
    settings = json.loads((workload.tokenizer / "config.json").read_text())
    settings.update(workload.model_overrides)
    settings.pop("layer_types", None)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with atomic_directory(folder, replace=True) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
            "special_tokens_map.json",
            "added_tokens.json",
            "generation_config.json",
        ):
            if (workload.tokenizer / name).is_file():
                shutil.copyfile(workload.tokenizer / name, temporary / name)
    return folder


def prepare(workload: Workload, tokenizer):
    from core.data import load_preferences
    from core.tokenization import ChatTokenizer, tokenize_pairs

    pairs, _ = load_preferences(workload.data)
    chat = ChatTokenizer(tokenizer)
    tokenized, _ = tokenize_pairs(
        pairs[: workload.pairs], chat, max_length=workload.max_length, max_prompt_length=workload.max_prompt_length
    )
    return chat, tokenized


def make_backend(variant: str, device: str, dtype: str):
    checkpointing = variant.endswith("-gc")
    if variant.startswith("mlx"):
        from backends.mlx_backend.backend import MlxBackend

        return MlxBackend(dtype="float32" if dtype == "auto" else dtype, gradient_checkpointing=checkpointing)
    from backends.torch_backend.backend import TorchBackend

    return TorchBackend(
        device=device, dtype=dtype, naive_logits=variant.startswith("torch-naive"), gradient_checkpointing=checkpointing
    )


class DeviceClock:
    """Synchronizes and measures the accelerator where there is one (CUDA), so timings are real."""

    def __init__(self, backend) -> None:
        self.cuda = getattr(getattr(backend, "device", None), "type", None) == "cuda"
        self.mlx = backend.name == "mlx"

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        if self.mlx:
            import mlx.core as mx

            mx.reset_peak_memory()

    def synchronize(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def peak(self) -> dict:
        if self.cuda:
            import torch

            return {"peak_device": float(torch.cuda.max_memory_allocated()), "gpu": torch.cuda.get_device_name()}
        if self.mlx:
            import mlx.core as mx

            return {"peak_mlx": float(mx.get_peak_memory())}
        return {}


def measure(workload: Workload, variant: str, steps: int, device: str, dtype: str, seed: int = 0) -> dict:
    from core.batching import collate, plan_batches
    from core.config import LoraConfig
    from core.objectives import DPO
    from core.reference import compute_reference

    backend = make_backend(variant, device, dtype)
    backend.load_model(str(model_folder(workload)))
    backend.seed(seed)
    backend.attach_lora(LoraConfig(rank=workload.lora_rank, alpha=workload.lora_alpha))
    backend.setup_optimizer(weight_decay=0.0)
    chat, tokenized = prepare(workload, backend.tokenizer)
    pad = getattr(backend, "pad_to_multiple_of", 1)
    plan = plan_batches([p.length for p in tokenized], workload.batch_pairs, seed=seed)[: steps + 1]
    used = [tokenized[i] for batch in plan for i in batch]
    started = time.perf_counter()
    reference = compute_reference(
        backend, used, batch_size=workload.batch_pairs, pad_id=chat.pad_id, adapter=False, pad_to_multiple_of=pad
    )
    reference_seconds = time.perf_counter() - started
    objective = DPO(workload.beta)
    clock = DeviceClock(backend)
    resident_before = memory.current_bytes()
    exact_peak = memory.reset_peak()
    clock.reset_peak()
    seconds, tokens, losses = [], [], []
    for index, rows in enumerate(plan):
        batch = collate([tokenized[i] for i in rows], chat.pad_id, pad)
        clock.synchronize()
        started = time.perf_counter()
        result = backend.forward_backward(batch, objective, reference.for_batch(batch.pair_indices), 0.0, 1.0)
        backend.apply_gradients(workload.lr, 1.0)
        clock.synchronize()
        if index > 0:  # the first step warms up allocators, kernels and compilation
            seconds.append(time.perf_counter() - started)
            tokens.append(batch.num_tokens)
        losses.append(result.metrics["loss"])
    info = backend.info()
    return {
        "variant": variant,
        "device": info.device,
        "dtype": info.dtype,
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
        **clock.peak(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    figures = measure(WORKLOADS[args.workload], args.variant, args.steps, args.device, args.dtype)
    print("BENCH " + json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
