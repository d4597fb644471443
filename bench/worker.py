"""One benchmark measurement in a fresh process (so its peak memory is its own); prints one JSON line.

Every variant loads the same weights (a workload's random-init model is built once, seed 0, and saved),
reads the same pairs in the same order (the first N of the data, consecutive batches: TRL is told to use a
sequential sampler), starts from the same LoRA weights (A drawn from a seed per module name, B zero),
and steps AdamW with a linear schedule and no warm-up (TRL's defaults). So the losses of every step
compare across Duet's backends and TRL, and the timings measure the same work.

Timing: ``total_seconds`` runs from the start of data preparation (after the model is loaded) to the end
of the last step, so it holds tokenization and all reference work; ``seconds_per_step`` is the median
step after the first. Peak memory: the process's resident high-water mark, reset once the model is
loaded (Linux), so it covers data, reference and training; on CUDA, the device's peak allocation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.api import Config, build_objective, config_from_dict, create_backend, resolve_model
from bench import memory
from bench.background import background_load
from bench.workloads import WORKLOADS, Workload


@dataclass(frozen=True)
class Variant:
    """What one bench variant runs: Duet with these config settings (the same keys a user sets), or TRL with
    these `DPOConfig` fields."""

    tool: str  # "duet" or "trl"
    settings: dict[str, Any] = field(default_factory=dict)
    # the torch backend's full-vocabulary log-prob path: a reference point for the kernel, no user setting
    full_logits: bool = False
    # model.threads = torch's own default (one thread a core), what Duet ran with before model.threads existed
    torch_default_threads: bool = False
    # PEFT's own LoRA forward instead of Duet's fused one (backends/torch_backend/lora.py), no user setting
    peft_lora: bool = False


VARIANTS: dict[str, Variant] = {
    "duet-torch": Variant("duet", {"model.backend": "torch"}),
    "duet-torch-gc": Variant("duet", {"model.backend": "torch", "model.gradient_checkpointing": True}),
    "duet-torch-naive": Variant("duet", {"model.backend": "torch"}, full_logits=True),
    "duet-torch-unshared": Variant("duet", {"model.backend": "torch", "model.share_prompts": False}),
    # every batch in one padded pass (what padding_free: auto does on a GPU), for its cost on a CPU
    "duet-torch-padded": Variant("duet", {"model.backend": "torch", "model.padding_free": False}),
    "duet-torch-threads1": Variant("duet", {"model.backend": "torch", "model.threads": 1}),
    "duet-torch-threads-torch": Variant("duet", {"model.backend": "torch"}, torch_default_threads=True),
    "duet-torch-peft-lora": Variant("duet", {"model.backend": "torch"}, peft_lora=True),
    # freed activation blocks kept for the next step (host_memory.py): faster, a higher peak
    "duet-torch-fast-memory": Variant("duet", {"model.backend": "torch", "model.host_memory": "fast"}),
    # bf16 weights, products under bf16 autocast, fp32 LoRA weights: on a CPU with AMX or AVX512-BF16 too
    "duet-torch-bf16": Variant("duet", {"model.backend": "torch", "model.dtype": "bfloat16"}),
    "duet-torch-bf16-gc": Variant(
        "duet", {"model.backend": "torch", "model.dtype": "bfloat16", "model.gradient_checkpointing": True}
    ),
    "duet-mlx": Variant("duet", {"model.backend": "mlx"}),
    "duet-mlx-gc": Variant("duet", {"model.backend": "mlx", "model.gradient_checkpointing": True}),
    "duet-mlx-unshared": Variant("duet", {"model.backend": "mlx", "model.share_prompts": False}),
    "trl": Variant("trl"),
    "trl-precompute": Variant("trl", {"precompute_ref_log_probs": True}),
    "trl-liger": Variant("trl", {"use_liger_kernel": True}),  # CUDA only: Liger's kernels are Triton's
    "trl-bf16": Variant("trl", {"bf16": True}),  # bf16 weights and TRL's autocast, on a CPU too
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_folder(workload: Workload) -> Path:
    """The workload's model: the demo model, or a random-init model of the workload's shape saved once."""
    if isinstance(workload.model, str):  # a registry name: its folder (a GGUF file is converted once)
        return Path(resolve_model(workload.model))
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


PAIRS: int | None = None  # --pairs: fewer pairs than the workload's (slow backends)
LATE_LOAD: tuple[int, int] | None = None  # --late-load N --load-from-step K: N spinners from step K on


def workload_pairs(workload: Workload):
    from core.data import load_preferences

    pairs, _ = load_preferences(workload.data)
    return pairs[: PAIRS or workload.pairs]


def lora_start(module: str, kind: str, shape: tuple[int, int]) -> np.ndarray:
    """The starting value of one LoRA matrix in PEFT's layout (A [r, in], B [out, r]), the same in every
    process and library: A uniform in ±1/√in from a seed derived from the module's name, B zero."""
    if kind == "B":
        return np.zeros(shape, np.float32)
    bound = 1.0 / np.sqrt(shape[1])
    return np.random.default_rng(zlib.crc32(module.encode())).uniform(-bound, bound, size=shape).astype(np.float32)


def _module(name: str) -> tuple[str, str]:
    """(the module a LoRA parameter belongs to, as named inside the base model; "A" or "B")."""
    name = name.removeprefix("base_model.model.")
    for suffix, kind in (
        (".lora_A.default.weight", "A"),
        (".lora_B.default.weight", "B"),
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_a", "A"),
        (".lora_b", "B"),
    ):
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    raise ValueError(f"not a LoRA parameter: {name}")


def set_lora_start_torch(model) -> None:
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                module, kind = _module(name)
                parameter.copy_(torch.from_numpy(lora_start(module, kind, tuple(parameter.shape))))


def set_lora_start_mlx(model) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    updates = []
    for name, value in tree_flatten(model.trainable_parameters()):
        module, kind = _module(name)  # mlx-lm's a is Aᵀ, b is Bᵀ
        updates.append((name, mx.array(lora_start(module, kind, tuple(reversed(value.shape))).T)))
    model.load_weights(updates, strict=False)


def duet_config(workload: Workload, variant: Variant, steps: int, device: str, dtype: str) -> Config:
    """The config a user would write for this workload: DPO with the workload's LoRA, β and learning rate,
    a linear schedule without warm-up and no weight decay (TRL's defaults), the pairs in their file order."""
    settings: dict[str, Any] = {
        "model.path": str(model_folder(workload)),
        "model.device": device,
        "model.dtype": dtype,
        "model.logprob_chunk_size": CHUNK,
        "lora.rank": workload.lora_rank,
        "lora.alpha": workload.lora_alpha,
        "lora.target_modules": TARGETS,
        "objective.name": "dpo",
        "objective.beta": workload.beta,
        "train.batch_size": workload.batch_pairs,
        "train.max_steps": steps,
        "train.lr": workload.lr,
        "train.schedule": "linear",
        "train.warmup_steps": 0,
        "train.weight_decay": 0.0,
        "train.max_grad_norm": 1.0,
        "train.shuffle": False,
        "train.seed": 0,
        **variant.settings,
    }
    if variant.torch_default_threads:
        settings["model.threads"] = torch_default_threads()
    if settings["model.backend"] == "mlx" and dtype == "auto":
        settings["model.dtype"] = "float32"  # the weights as the workload saved them, on every backend
    nested: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    return config_from_dict(nested)


def torch_default_threads() -> int:
    """The thread count torch starts with in this process (a core each, or OMP_NUM_THREADS): read before
    any backend sets its own, which a bench worker's fresh process guarantees."""
    import torch

    return torch.get_num_threads()


def make_backend(config: Config, variant: Variant):
    """The backend through the same factory a run uses, with its model and a LoRA that starts where TRL's does."""
    backend = create_backend(config)
    if variant.full_logits:
        backend.naive_logits = True
    if variant.peft_lora:
        backend.fuse_lora = False
    backend.load_model(config.model.path)
    backend.seed(config.train.seed)
    backend.attach_lora(config.lora)
    if backend.name == "mlx":
        set_lora_start_mlx(backend.model)
    else:
        set_lora_start_torch(backend.model)
    backend.setup_optimizer(weight_decay=config.train.weight_decay)
    return backend


CHUNK: int | str = "auto"  # reply positions per LM-head chunk (`model.logprob_chunk_size`); --chunk changes it


def chunk_setting(text: str) -> int | str:
    """--chunk: "auto" (Duet's default) or a positive number of positions."""
    if text == "auto":
        return text
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("--chunk must be positive or auto")
    return value


class DeviceClock:
    """Synchronizes and measures the accelerator where there is one (CUDA), so timings are real."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "cuda", "mlx" or "cpu"

    def reset_peak(self) -> None:
        memory.reset_peak()
        if self.kind == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.kind == "mlx":
            import mlx.core as mx

            mx.reset_peak_memory()

    def synchronize(self) -> None:
        if self.kind == "cuda":
            import torch

            torch.cuda.synchronize()

    def figures(self) -> dict:
        figures = {"peak_resident": memory.peak_bytes()}
        if self.kind == "cuda":
            import torch

            figures.update(peak_device=float(torch.cuda.max_memory_allocated()), gpu=torch.cuda.get_device_name())
        elif self.kind == "mlx":
            import mlx.core as mx

            figures["peak_mlx"] = float(mx.get_peak_memory())
        return figures


@dataclass
class Timings:
    """What one run measured: each step's seconds, tokens and loss, the whole run and its reference pass."""

    seconds: list[float]
    tokens: list[int]
    losses: list[float]
    total: float
    reference: float


def summary(
    variant: str, device: str, dtype: str, timings: Timings, workload: Workload, clock: DeviceClock, before: float
) -> dict:
    seconds, tokens = timings.seconds, timings.tokens
    timed = seconds[1:] or seconds  # the first step warms up allocators, kernels and compilation
    return {
        "variant": variant,
        "device": device,
        "dtype": dtype,
        "steps": len(seconds),
        "seconds_per_step": statistics.median(timed),
        "step_seconds": seconds,
        "tokens_per_second": sum(tokens[1:] or tokens) / sum(timed),
        "pairs_per_second": workload.batch_pairs * len(seconds) / timings.total,
        "total_seconds": timings.total,
        "reference_seconds": timings.reference,
        "losses": timings.losses,
        "resident_before": before,
        **clock.figures(),
    }


def measure_duet(workload: Workload, variant: Variant, steps: int, device: str, dtype: str) -> dict:
    """Duet's steps as a run takes them: the trainer's `optimizer_step` over its batch stream and schedule."""
    from core.reference import compute_reference
    from core.schedule import learning_rate, warmup_steps
    from core.tokenization import ChatTokenizer, tokenize_pairs
    from core.trainer import TrainData, micro_batches, optimizer_step

    config = duet_config(workload, variant, steps, device, dtype)
    backend = make_backend(config, variant)
    kind = "mlx" if backend.name == "mlx" else backend.device.type
    clock = DeviceClock(kind)
    resident_before = memory.current_bytes()
    clock.reset_peak()
    started = time.perf_counter()
    chat = ChatTokenizer(backend.tokenizer)
    tokenized, _ = tokenize_pairs(
        workload_pairs(workload), chat, max_length=workload.max_length, max_prompt_length=workload.max_prompt_length
    )
    pad = getattr(backend, "pad_to_multiple_of", 1)
    reference_started = time.perf_counter()
    # as a run does: the reference pass takes twice the training batch (no gradients, so it fits)
    reference = compute_reference(
        backend,
        tokenized,
        batch_size=2 * config.train.batch_size,
        pad_id=chat.pad_id,
        adapter=False,
        pad_to_multiple_of=pad,
    )
    reference_seconds = time.perf_counter() - reference_started
    data = TrainData(tokenized, [], reference, None, chat.pad_id, pad)
    objective = build_objective(config.objective)
    stream = micro_batches(data, config, 0, 0)
    train = config.train
    warmup = warmup_steps(steps, train.warmup_steps, train.warmup_ratio)
    seconds, tokens, losses, moves = [], [], [], []
    with contextlib.ExitStack() as late_load:
        for step in range(steps):
            if LATE_LOAD and step + 1 == LATE_LOAD[1]:
                late_load.enter_context(background_load(LATE_LOAD[0]))
            lr = learning_rate(step, total_steps=steps, peak=train.lr, warmup=warmup, kind=train.schedule)
            clock.synchronize()
            step_started = time.perf_counter()
            outcome = optimizer_step(backend, objective, data, config, stream, lr)
            clock.synchronize()
            seconds.append(time.perf_counter() - step_started)
            tokens.append(outcome.tokens)
            losses.append(outcome.metrics["loss"])
            moved = backend.between_steps()  # as the trainer does after each step (auto's re-look)
            if moved is not None:
                moves.append({"step": step + 1, "threads": moved[0]})
    total = time.perf_counter() - started
    info = backend.info()
    timings = Timings(seconds, tokens, losses, total, reference_seconds)
    figures = summary(variant_name(variant), info.device, info.dtype, timings, workload, clock, resident_before)
    figures["threads"] = info.details.get("threads")
    figures["thread_moves"] = moves
    if LATE_LOAD:
        first = LATE_LOAD[1] - 1
        figures["load_from_step"] = LATE_LOAD[1]
        figures["tokens_per_second_loaded"] = sum(tokens[first:]) / sum(seconds[first:]) if seconds[first:] else None
    return figures


def variant_name(variant: Variant) -> str:
    return next(name for name, known in VARIANTS.items() if known is variant)


class Unavailable(Exception):
    """The variant cannot run here (a missing package, no GPU): reported as the row's error, not a crash."""


def trl_unavailable(variant: str, device: str) -> str | None:
    """Why a TRL variant cannot run here, or None. trl-liger is TRL's DPOConfig(use_liger_kernel=True): Liger's
    fused DPO loss, Triton kernels, so CUDA and the liger-kernel package."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return "TRL is not installed (pip install -e '.[bench]')"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return "--device cuda, but torch sees no CUDA GPU"
    if not VARIANTS[variant].settings.get("use_liger_kernel"):
        return None
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed: trl-liger needs it (pip install liger-kernel)"
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return "trl-liger needs a CUDA GPU (Liger's kernels are Triton kernels)"
    return None


def measure_trl(workload: Workload, variant: str, steps: int, device: str, dtype: str) -> dict:
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    reason = trl_unavailable(variant, device)
    if reason:
        raise Unavailable(reason)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    folder = model_folder(workload)
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    # bf16 on the GPU by default; on the CPU when asked (--dtype bfloat16 or trl-bf16: TRL's autocast)
    settings = dict(VARIANTS[variant].settings)
    bf16 = settings.pop("bf16", (cuda and dtype == "auto") or dtype == "bfloat16")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if bf16 else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [
        {
            "prompt": p.conversation(),
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in workload_pairs(workload)
    ]
    clock = DeviceClock("cuda" if cuda else "cpu")
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            clock.synchronize()
            step_times.append(time.perf_counter() - self.started)

    resident_before = memory.current_bytes()
    clock.reset_peak()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        # the workload's settings, TRL's defaults otherwise (its gradient checkpointing included); only the
        # sampler is sequential (for the same data as Duet), and fp32 unless the GPU takes bf16
        args = DPOConfig(
            output_dir=out,
            use_cpu=not cuda,
            bf16=bf16,
            fp16=False,
            per_device_train_batch_size=workload.batch_pairs,
            max_steps=steps,
            learning_rate=workload.lr,
            beta=workload.beta,
            max_length=workload.max_length,
            train_sampling_strategy="sequential",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
            **settings,
        )
        lora = LoraConfig(
            r=workload.lora_rank,
            lora_alpha=workload.lora_alpha,
            lora_dropout=0.0,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        )
        prepare_started = time.perf_counter()
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[StepTimer()],
        )
        precomputed = settings.get("precompute_ref_log_probs", False)
        reference_seconds = time.perf_counter() - prepare_started if precomputed else 0.0
        set_lora_start_torch(trainer.model)
        trainer.train()
    total = time.perf_counter() - started
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    losses = [float(h["loss"]) for h in history]
    place, precision = ("cuda" if cuda else "cpu"), ("bfloat16" if bf16 else "float32")
    timings = Timings(step_times, [0] * len(step_times), losses, total, reference_seconds)
    figures = summary(variant, place, precision, timings, workload, clock, resident_before)
    figures["tokens_per_second"] = None
    figures["threads"] = torch.get_num_threads()
    return figures


def main(argv: list[str] | None = None) -> int:
    global CHUNK, PAIRS, LATE_LOAD
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--variant", required=True, choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--chunk", type=chunk_setting, default=CHUNK)
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--late-load", type=int, default=0)
    parser.add_argument("--load-from-step", type=int, default=None)
    args = parser.parse_args(argv)
    CHUNK, PAIRS = args.chunk, args.pairs
    LATE_LOAD = (args.late_load, args.load_from_step) if args.load_from_step else None
    workload = WORKLOADS[args.workload]
    variant = VARIANTS[args.variant]
    try:
        if variant.tool == "trl" and LATE_LOAD:
            raise Unavailable("--load-from-step is for Duet's variants (TRL's loop is its own)")
        if variant.tool == "trl":
            figures = measure_trl(workload, args.variant, args.steps, args.device, args.dtype)
        else:
            figures = measure_duet(workload, variant, args.steps, args.device, args.dtype)
    except Unavailable as exc:
        print("BENCH " + json.dumps({"variant": args.variant, "error": f"unavailable: {exc}"}), flush=True)
        return 0
    print("BENCH " + json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
