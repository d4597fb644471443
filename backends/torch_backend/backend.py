"""The PyTorch backend: transformers models, PEFT LoRA, the chunked response-only log-prob kernel, AdamW.

bf16 on CUDA (LoRA weights kept in fp32, matmuls under autocast), fp16 with loss scaling on GPUs without
bf16, fp32 on CPU and MPS.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.torch_backend.host_memory import configure_host_memory, give_back_free_heap, heap_reuse
from backends.torch_backend.kernel import (
    gathered_sequence_logps,
    head_blocking,
    logit_transform,
    naive_sequence_logps,
    shared_prompt_mask,
)
from backends.torch_backend.lora import fuse_lora_layers
from backends.torch_backend.mlp import fuse_swiglu_blocks
from backends.torch_backend.ops import TorchOps
from backends.torch_backend.shared_attention import NAME as SHARED_ATTENTION
from backends.torch_backend.shared_attention import register as register_shared_attention
from backends.torch_backend.threads import (
    LoadSample,
    ThreadChoice,
    ThreadGovernor,
    choose_threads,
    environment_threads,
    usable_cores,
)
from core.adapters import sort_target_modules
from core.backend import (
    Backend,
    BackendError,
    BackendInfo,
    StepResult,
    UpdateResult,
    check_adapter_fits,
    peak_rss_bytes,
)
from core.batching import Batch, SharedPromptBatch, share_prompts, sharing_pays
from core.config import LoraConfig
from core.distributed import SINGLE, Collective
from core.errors import DuetError
from core.models_io import ModelError, check_model_folder, load_tokenizer, resolve_model_path
from core.objectives import Objective, PolicyOutputs, evaluate

# float64 is not offered in configs: it exists so tests can check exactness where float32 rounding would hide it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class OutOfMemory(DuetError):
    """The device ran out of memory; the message says which settings reduce it."""


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise BackendError(
            "model.device=cuda, but torch sees no CUDA GPU here (torch "
            f"{torch.__version__}, built for CUDA: {torch.version.cuda}). Use model.device=auto."
        )
    if choice == "mps" and not torch.backends.mps.is_available():
        raise BackendError("model.device=mps, but MPS is not available here. Use model.device=auto.")
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice != "auto":
        return DTYPES[choice]
    if device.type == "cuda":
        # native bf16 only (Ampere and later): T4/V100 would emulate it slowly; they get fp16 with loss scaling
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16; Linux's /proc/cpuinfo says)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_generation_precision(choice: str, device: torch.device) -> str:
    """``sampling.precision``: auto is bfloat16 on a CPU that does bf16 natively, else float32 (on a GPU the
    model's own dtype, under autocast, already applies)."""
    if choice != "auto":
        return choice if device.type == "cpu" else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


def block_linear_names(model: Any) -> list[str]:
    """The names of the linear layers inside the transformer blocks (what "all-linear" means)."""
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and "layers" in parts:
            names.add(parts[-1])
    return sorted(names)


def enable_checkpointing(model: Any) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant, so frozen inputs are fine)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def out_of_memory_advice(what: str, batch: Batch | None = None):
    """Turn the device's out-of-memory error into advice on the settings that reduce memory."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        shape = f" (batch of {batch.num_pairs} pairs × {batch.input_ids.shape[1]} tokens)" if batch else ""
        raise OutOfMemory(
            f"out of memory during {what}{shape}. To use less: lower train.batch_size and raise train.grad_accum "
            "(same effective batch), lower data.max_length, set model.gradient_checkpointing=true, or lower "
            "model.logprob_chunk_size."
        ) from None


class ResponseLogProbs(torch.nn.Module):
    """The log-prob kernel as a module (what DistributedDataParallel wraps under torchrun): one decoder pass,
    then the reply tokens' log-probs from the gathered hidden states, summed per sequence."""

    def __init__(
        self, causal_lm: torch.nn.Module, chunk_size: int, transform: Any, vocab_block: int | None = None
    ) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.chunk_size = chunk_size
        self.transform = transform
        self.vocab_block = vocab_block

    def forward(
        self,
        inputs: dict[str, torch.Tensor],
        count: int,
        row_lengths: list[int] | None = None,
        row_parts: list[tuple[int, int, int]] | None = None,
    ) -> torch.Tensor:
        return gathered_sequence_logps(
            self.causal_lm.get_decoder(),
            self.causal_lm.get_output_embeddings(),
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs.get("position_ids"),
            inputs["rows"],
            inputs["positions"],
            inputs["targets"],
            inputs["outputs"],
            count,
            self.chunk_size,
            self.transform,
            self.vocab_block,
            row_lengths,
            row_parts,
        )


def kernel_inputs(
    batch: Batch, share: bool | str, pad_to_multiple_of: int = 1
) -> tuple[dict[str, np.ndarray], int, bool]:
    """(arrays, sequences, shared): the batch as the kernel takes it, each pair's prompt packed once when that
    saves work (share "auto": when it cuts the tokens to run by a fifth or more)."""
    pairs = batch.num_pairs
    use = share is True or (share == "auto" and sharing_pays(batch.shared_prompt_tokens, batch.input_ids.size))
    if use:
        packed = share_prompts(batch, pad_id=0, pad_to_multiple_of=pad_to_multiple_of)
        return (
            {
                "input_ids": packed.input_ids,
                "segments": packed.segments,
                "position_ids": packed.position_ids,
                "rows": packed.rows,
                "positions": packed.positions,
                "targets": packed.targets,
                "outputs": packed.outputs,
                "lengths": (packed.segments != SharedPromptBatch.PADDING).sum(axis=1),
                "parts": np.stack(
                    [(packed.segments == part).sum(axis=1) for part in (PROMPT, CHOSEN, REJECTED)], axis=1
                ),
            },
            2 * pairs,
            True,
        )
    rows, positions = np.nonzero(batch.loss_mask[:, 1:])
    # no padding mask: rows are right-padded, so under the causal mask no real token ever sees a pad, and
    # without an explicit mask attention can take its fused causal kernel (no [T, T] scores kept)
    arrays = {
        "input_ids": batch.input_ids,
        "rows": rows,
        "positions": positions,
        "targets": batch.input_ids[rows, positions + 1],
        "outputs": rows,
        "lengths": batch.attention_mask.sum(axis=1),
    }
    return arrays, batch.input_ids.shape[0], False


PROMPT, CHOSEN, REJECTED = SharedPromptBatch.PROMPT, SharedPromptBatch.CHOSEN, SharedPromptBatch.REJECTED


@dataclass(frozen=True)
class KernelLayout:
    """A batch as the kernel runs it (see ``TorchBackend._layout``)."""

    arrays: dict[str, np.ndarray]  # kernel_inputs' arrays, less lengths and parts
    count: int  # sequences out
    shared: bool  # each pair's prompt packed once, in one row
    unpad: bool  # rows run one by one at their own lengths
    split: bool  # shared rows attend in two causal parts (shared_attention.py)
    lengths: np.ndarray  # each row's real tokens
    parts: np.ndarray | None  # shared rows' (prompt, chosen, rejected) lengths


def pair_by_pair(layout: KernelLayout, objective: Objective, pairs: int) -> bool:
    """Whether a training step runs forward and backward one pair at a time (``_pair_by_pair``): where its
    rows run one by one anyway, so nothing is lost to smaller passes, and the objective's loss is a mean of
    per-pair terms (``per_example_loss``). KTO's is not: its z0 is taken over the whole batch's mismatched
    replies."""
    return layout.unpad and objective.per_example_loss and pairs > 1


UNPADDING_PAYS = 0.1  # run rows one by one when that skips at least this share of a batch's tokens
UNPADDED_ROW_TOKENS = 128  # ... and the rows average at least this many real tokens


def unpadding_pays(lengths: np.ndarray, width: int, split_attention: bool = False) -> bool:
    """The rule behind ``model.padding_free: auto`` (on a CPU): run a batch row by row at each row's own
    length when its rows are long enough to keep the matrix units busy on their own and that saves work:
    padding is a tenth or more of its tokens, or (``split_attention``) shared-prompt rows whose attention
    then runs in two causal parts (shared_attention.py), padded or not. Short rows (the demo's 40 tokens on
    a 4-layer model) lose more to the extra passes' fixed costs than padding costs them (measured: 17%
    slower); a GPU keeps the batched pass, whose rows run in parallel."""
    rows, real = len(lengths), int(lengths.sum())
    if real < UNPADDED_ROW_TOKENS * rows:
        return False
    return split_attention or (rows > 1 and real <= (1.0 - UNPADDING_PAYS) * rows * width)


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        device: str = "auto",
        dtype: str = "auto",
        gradient_checkpointing: bool = False,
        chunk_size: int | str = "auto",
        naive_logits: bool = False,
        collective: Collective = SINGLE,
        share_prompts: bool | str = "auto",
        padding_free: bool | str = "auto",
        generation_precision: str = "float32",
        threads: int | str = "auto",
        host_memory: str = "lean",
    ) -> None:
        self.threads = threads  # model.threads: a count, or "auto" (see threads.py)
        # auto watches the machine's load from now until the model has loaded (only when it will be used)
        self._load = LoadSample() if threads == "auto" and environment_threads(os.environ) is None else None
        self.thread_choice: ThreadChoice | None = None
        self._governor: ThreadGovernor | None = None  # auto on a CPU: follows the machine's load between steps
        self.share_prompts = share_prompts  # True, False or "auto": pack each prompt once
        self.padding_free = padding_free  # True, False or "auto": rows one by one at their own lengths
        self.generation_precision = generation_precision  # "float32", "bfloat16" or "auto" (see generation_model)
        self._generation_models: dict[bool, tuple[Any, Any]] = {}  # adapter on/off → (weights' key, model)
        self.collective = collective
        self._ddp: Any = None
        self._logps_module: Any = None
        self._split_attention = False
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device.type == "cpu":
            configure_host_memory(host_memory)
        self.gradient_checkpointing = gradient_checkpointing
        self.chunk_size = chunk_size
        self.naive_logits = naive_logits  # the full-logits path, for benchmarks and checks only
        self.fuse_lora = True  # False keeps PEFT's own LoRA forward (a benchmark's point of comparison)
        self.ops = TorchOps()  # evaluation: each rank's own shard, so no exchange (ranks' shard counts differ)
        self._training_ops = TorchOps(collective)  # training: every rank takes every step together
        self.model: Any = None
        self.tokenizer: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self._transform = None
        self.model_location = ""
        self.model_revision: str | None = None

    # -- model and adapter ------------------------------------------------------------------------------

    def load_model(self, path: str, *, trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # PEFT still asks for a transformers attribute that now warns on every call; the warning is not ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        location = resolve_model_path(path)
        check_model_folder(location, path)
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=self.dtype, trust_remote_code=trust_remote_code, use_safetensors=True
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(
                f"model {path}: could not load it with transformers ({str(exc).splitlines()[0]}). "
                "A model folder needs config.json and its weights (*.safetensors)."
            ) from None
        self.use_model(model, self.tokenizer, location)
        self.model_revision = getattr(model.config, "_commit_hash", None)

    def use_model(self, model: Any, tokenizer: Any, location: str) -> None:
        """Adopt a model built in memory (random-init benchmark shapes) instead of loading one."""
        # only the device: loading already chose the dtype, and casting again would also cast buffers that
        # must stay fp32 (rotary frequencies, modules transformers keeps in fp32)
        model.to(self.device)
        model.config.use_cache = False
        self._apply_threads(sum(p.numel() for p in model.parameters()))
        if self.gradient_checkpointing:
            enable_checkpointing(model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model, self.tokenizer = model, tokenizer
        self.model_location, self.model_revision = location, None
        self._transform = logit_transform(model.config)
        # a CPU's shared-prompt rows, one at a time, attend in two causal parts (shared_attention.py); the
        # implementation defers to transformers' SDPA for every other call
        self._split_attention = self.device.type == "cpu" and model.config._attn_implementation == "sdpa"
        if self._split_attention:
            register_shared_attention()
            model.config._attn_implementation = SHARED_ATTENTION

    def _apply_threads(self, parameters: int) -> None:
        """Set torch's CPU thread count for this process, before any heavy work (the model is loaded, nothing
        has run on it yet). Inter-op threads are left alone: training runs no inter-op parallel work, and torch
        allows setting them only once per process."""
        busy = self._load.busy_cores() if self._load is not None else 0.0
        # between steps auto needs /proc/stat: a load average would count this run's own threads as load
        automatic = self._load is not None and self.device.type == "cpu" and self._load.ticks is not None
        self._load = None
        cores = usable_cores()
        self.thread_choice = choose_threads(
            self.threads, os.environ, cores, busy, parameters, accelerator=self.device.type != "cpu"
        )
        torch.set_num_threads(self.thread_choice.threads)
        if automatic:
            self._governor = ThreadGovernor(cores, parameters, self.thread_choice.threads, torch.set_num_threads)

    def attach_lora(self, lora: LoraConfig, adapter_path: str | None = None) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import PeftModel, get_peft_model

        if adapter_path is not None:
            if not (Path(adapter_path) / "adapter_model.safetensors").is_file():
                raise BackendError(
                    f"model.adapter {adapter_path}: no adapter_model.safetensors there (pickled "
                    "adapter_model.bin files are refused; PEFT saves safetensors by default)."
                )
            try:
                self.model = PeftModel.from_pretrained(self.model, adapter_path, is_trainable=True)
            except (ValueError, OSError, KeyError, RuntimeError) as exc:
                raise BackendError(
                    f"model.adapter {adapter_path}: PEFT could not load it onto this model "
                    f"({str(exc).splitlines()[0]})."
                ) from None
        else:
            layers = None
            targets = lora.target_modules
            if lora.layers is not None:
                total = self.model.config.num_hidden_layers
                layers = list(range(max(0, total - lora.layers), total))
                if targets == "all-linear":  # PEFT takes a layer subset only with named modules
                    targets = block_linear_names(self.model)
            try:
                config = PeftLoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=targets,
                    layers_to_transform=layers,
                    task_type="CAUSAL_LM",
                )
                self.model = get_peft_model(self.model, config)
            except ValueError as exc:
                raise BackendError(f"lora.target_modules {lora.target_modules!r}: {exc}") from None
        for parameter in self.model.parameters():
            if parameter.requires_grad:  # master weights for the adapter: fp32, or the model's own if wider
                parameter.data = parameter.data.to(torch.promote_types(parameter.dtype, torch.float32))
        if self.fuse_lora:  # the update added inside the base product's GEMM (lora.py says why)
            fuse_lora_layers(self.model)
            fuse_swiglu_blocks(self.model)  # SwiGLU keeps 2 of its 4 wide tensors for backward (mlp.py)
        causal_lm = self._causal_lm()
        vocab_size = causal_lm.get_output_embeddings().weight.shape[0]
        chunk, vocab_block = head_blocking(self.chunk_size, vocab_size, self.device.type)
        self._logps_module = ResponseLogProbs(causal_lm, chunk, self._transform, vocab_block)
        if self.collective.enabled:
            self._wrap_ddp()

    def _wrap_ddp(self) -> None:
        """DistributedDataParallel over the log-prob module, syncing the LoRA weights only: the frozen base is
        identical on every rank (each loaded it), so neither broadcast nor hooked."""
        from torch.nn.parallel import DistributedDataParallel

        frozen = [name for name, p in self._logps_module.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self._logps_module, frozen)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers (rotary frequencies) are the same on every rank: no need to sync them each forward. torch 2.13
        # names that forward_sync_buffers (broadcast_buffers is deprecated there); older releases lack it.
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
            no_buffer_sync = {"forward_sync_buffers": False}
        else:
            no_buffer_sync = {"broadcast_buffers": False}
        self._ddp = DistributedDataParallel(self._logps_module, device_ids=device_ids, **no_buffer_sync)

    def _parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for _, p in self._parameters())

    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- compute ----------------------------------------------------------------------------------------

    def _autocast(self):
        # bf16 on a CPU, too: with AMX or AVX512-BF16 its matrix products run several times faster than fp32
        # (6.6× for a 2048² GEMM on 2 Sapphire Rapids cores), and autocast keeps softmax and norms in fp32
        if self.dtype == torch.bfloat16 and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=self.dtype)
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def _tensors(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        to = lambda a: torch.from_numpy(a).to(self.device, dtype=torch.long)  # noqa: E731
        return to(batch.input_ids), to(batch.attention_mask), to(batch.loss_mask)

    def _causal_lm(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _layout(self, batch: Batch, share: bool | None = None, unpad: bool | None = None) -> KernelLayout:
        """How the kernel runs this batch: its arrays, whether each prompt is packed once (``share``, or
        ``model.share_prompts``' choice) and whether rows run one by one (``unpad``, or the
        ``model.padding_free`` rule)."""
        arrays, count, shared = kernel_inputs(batch, self._sharing(batch) if share is None else share)
        lengths, parts = arrays.pop("lengths"), arrays.pop("parts", None)
        split = shared and self._split_attention
        if unpad is None:
            unpad = self.padding_free is True or (
                self.padding_free == "auto"
                and self.device.type == "cpu"
                and unpadding_pays(lengths, arrays["input_ids"].shape[1], split)
            )
        return KernelLayout(arrays, count, shared, unpad, split, lengths, parts)

    def _row_logps(self, batch: Batch, *, train: bool = False, layout: KernelLayout | None = None) -> torch.Tensor:
        if self.naive_logits:
            input_ids, attention_mask, loss_mask = self._tensors(batch)
            with self._autocast():
                return naive_sequence_logps(self.model, input_ids, attention_mask, loss_mask)
        layout = layout or self._layout(batch)
        unpad, split, shared = layout.unpad, layout.split, layout.shared
        inputs = {k: torch.from_numpy(v).to(self.device, dtype=torch.long) for k, v in layout.arrays.items()}
        segments = inputs.pop("segments", None)
        # split rows attend in two parts and need no [B, 1, T, T] mask
        inputs["attention_mask"] = shared_prompt_mask(segments) if shared and not (unpad and split) else None
        row_lengths = [int(n) for n in layout.lengths] if unpad else None
        row_parts = [tuple(int(n) for n in row) for row in layout.parts] if unpad and split else None
        with self._autocast():
            # training steps under torchrun go through DDP, which averages the LoRA gradients across ranks
            module = self._ddp if train and self._ddp is not None else self._logps_module
            return module(inputs, layout.count, row_lengths, row_parts)

    def _sharing(self, batch: Batch) -> bool | str:
        """``model.share_prompts`` for this batch. auto weighs the tokens the batch would run padded, so two
        batches holding the same pair could lay it out differently and round its log-probs differently. Where
        shared rows run one by one in two causal parts (a CPU, rows of 128 tokens or more), a pair's own row
        never runs more tokens than its two plain rows, so every pair shares, whatever it is batched with."""
        if self.share_prompts != "auto" or not self._split_attention or self.padding_free is False:
            return self.share_prompts
        return True if batch.shared_prompt_tokens >= UNPADDED_ROW_TOKENS * batch.num_pairs else "auto"

    def _adapter_disabled(self, adapter: bool):
        if adapter or not hasattr(self.model, "disable_adapter"):
            return contextlib.nullcontext()
        return self.model.disable_adapter()

    @torch.no_grad()
    def sequence_logps(self, batch: Batch, *, adapter: bool = True) -> np.ndarray:
        if self._governor is not None:  # a long reference pass (or duet eval's scoring) follows the load too
            self._governor.look()
        self.model.eval()
        with out_of_memory_advice("the log-prob pass", batch), self._adapter_disabled(adapter), heap_reuse():
            # to the host first: MPS has no float64
            return self._row_logps(batch).cpu().to(torch.float64).numpy()

    def _objective(
        self,
        batch: Batch,
        logps: torch.Tensor,
        objective: Objective,
        reference: np.ndarray | None,
        nll_weight: float,
        ops: TorchOps | None = None,
    ):
        # float32, or the log-probs' own precision when wider (float64 checks of exactness)
        lengths = torch.from_numpy(batch.response_lengths).to(self.device, dtype=logps.dtype)
        ref = None if reference is None else torch.from_numpy(np.asarray(reference)).to(self.device, logps.dtype)
        labels = None if batch.labels is None else torch.from_numpy(batch.labels).to(self.device, logps.dtype)
        return evaluate(objective, ops or self.ops, PolicyOutputs.from_rows(logps, lengths, ref, labels), nll_weight)

    def _step_result(self, batch: Batch, result) -> StepResult:
        metrics = {key: float(value) for key, value in result.metrics.items()}
        margins = (result.chosen_rewards - result.rejected_rewards).detach().cpu().to(torch.float64).numpy()
        return StepResult(metrics, margins, batch.num_pairs, batch.num_tokens)

    def forward_backward(
        self,
        batch: Batch,
        objective: Objective,
        reference: np.ndarray | None,
        nll_weight: float,
        scale: float,
        sync: bool = True,
    ) -> StepResult:
        self.model.train()
        layout = None if self.naive_logits else self._layout(batch)
        with out_of_memory_advice("the training step", batch):
            if layout is not None and pair_by_pair(layout, objective, batch.num_pairs):
                result = self._pair_by_pair(batch, layout, objective, reference, nll_weight, scale, sync)
                return self._step_result(batch, result)
            with self._no_sync(sync):
                logps = self._row_logps(batch, train=True, layout=layout)
                result = self._objective(batch, logps, objective, reference, nll_weight, self._training_ops)
                self._backward(result.loss * scale)
        return self._step_result(batch, result)

    def _no_sync(self, sync: bool):
        """Under torchrun, gradients are exchanged once per optimizer step: in its last backward pass only."""
        return self._ddp.no_sync() if self._ddp is not None and not sync else contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor) -> None:
        # the backward pass's blocks live one layer each (the forward's, kept for it, are freed as it goes);
        # not with checkpointing, whose backward re-runs the forward: the heap grew 0.46 GiB (1.68 GiB
        # where lean peaks at 1.22 on SmolLM2), and that setting is there for memory
        with contextlib.nullcontext() if self.gradient_checkpointing else heap_reuse():
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _pair_by_pair(
        self,
        batch: Batch,
        layout: KernelLayout,
        objective: Objective,
        reference: np.ndarray | None,
        nll_weight: float,
        scale: float,
        sync: bool,
    ):
        """Forward and backward one pair at a time, where rows run one by one anyway: the batch's loss is the
        mean of per-pair losses, so each pair's gradient is its own and the sum over pairs is the batch's
        (the order of the sums aside). Only one pair's activations are kept for a backward pass at a time,
        not the batch's, for no extra arithmetic. Each pair keeps the batch's layout, so its log-probs are
        the bits the batch would give. The metrics come from the whole batch's log-probs, as before."""
        pairs = batch.num_pairs
        each: list[torch.Tensor] = []  # each pair's (chosen, rejected) log-probs, detached
        for index in range(pairs):
            one = batch.pair(index)
            rows = [index, pairs + index]
            with self._no_sync(sync and index == pairs - 1):
                pair_logps = self._row_logps(one, train=True, layout=self._layout(one, share=layout.shared, unpad=True))
                pair_reference = None if reference is None else np.asarray(reference)[rows]
                pair_result = self._objective(one, pair_logps, objective, pair_reference, nll_weight)
                self._backward(pair_result.loss * (scale / pairs))
            if self.device.type == "cpu" and index < pairs - 1:
                # the next pair's forward should start from what this one used, not on top of its freed
                # small blocks (checkpointing's backward leaves them in the heap: 1.28 GiB peak, not 1.2)
                give_back_free_heap()
            each.append(pair_logps.detach())
        logps = torch.stack(each, dim=1).reshape(-1)  # [chosen_0 .. chosen_{B-1}, rejected_0 ..]
        with torch.no_grad():
            return self._objective(batch, logps, objective, reference, nll_weight, self._training_ops)

    @torch.no_grad()
    def evaluate(
        self, batch: Batch, objective: Objective, reference: np.ndarray | None, nll_weight: float
    ) -> StepResult:
        self.model.eval()
        with out_of_memory_advice("evaluation", batch), heap_reuse():
            result = self._objective(batch, self._row_logps(batch), objective, reference, nll_weight)
        return self._step_result(batch, result)

    def setup_optimizer(
        self, *, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        params = [p for _, p in self._parameters()]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            params, lr=0.0, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None
        )
        if self.device.type == "cuda" and self.dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")

    def apply_gradients(self, lr: float, max_grad_norm: float | None) -> UpdateResult:
        assert self.optimizer is not None, "setup_optimizer() first"
        params = [p for _, p in self._parameters()]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
        finite = bool(np.isfinite(grad_norm))
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cpu":  # the step's small freed blocks: back to the system under lean
            give_back_free_heap()
        return UpdateResult(grad_norm, finite, overflow=not finite and self.scaler is not None)

    def between_steps(self) -> tuple[int, str] | None:
        if self._governor is None:
            return None
        self._governor.look()
        moved = self._governor.unreported()
        if moved is not None:
            self.thread_choice = ThreadChoice(*moved)
        return moved

    def continue_threads(self, threads: int) -> None:
        if self._governor is not None:
            self._governor.continue_at(threads)
            self.thread_choice = ThreadChoice(threads, "auto, as the run was when it stopped")

    def discard_gradients(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    # -- state ------------------------------------------------------------------------------------------

    def adapter_weights(self) -> dict[str, np.ndarray]:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model)
        # copies: on the CPU .numpy() would share memory with the live parameters
        return {key: value.detach().float().cpu().numpy().copy() for key, value in state.items()}

    def save_adapter(self, directory: Path) -> None:
        self.model.save_pretrained(str(directory), safe_serialization=True)
        sort_target_modules(Path(directory))  # one file for one adapter, whatever the process's string hashing

    def load_adapter(self, directory: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        file = Path(directory) / "adapter_model.safetensors"
        if not file.is_file():
            raise BackendError(f"{directory}: no adapter_model.safetensors (a PEFT adapter folder is expected).")
        weights = load_file(str(file))
        expected = {k: tuple(v.shape) for k, v in self.adapter_weights().items()}
        check_adapter_fits(directory, expected, {k: tuple(v.shape) for k, v in weights.items()})
        set_peft_model_state_dict(self.model, weights)

    def optimizer_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        assert self.optimizer is not None
        arrays: dict[str, np.ndarray] = {}
        steps: dict[str, float] = {}
        for name, parameter in self._parameters():
            state = self.optimizer.state.get(parameter)
            if not state:
                continue
            arrays[f"{name}.exp_avg"] = state["exp_avg"].detach().cpu().numpy().copy()
            arrays[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().numpy().copy()
            steps[name] = float(state["step"])
        scalars: dict[str, Any] = {"step": steps}
        if self.scaler is not None:
            scalars["grad_scaler"] = {
                k: float(v) if isinstance(v, (int, float)) else v for k, v in self.scaler.state_dict().items()
            }
        return arrays, scalars

    def load_optimizer_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        assert self.optimizer is not None
        for name, parameter in self._parameters():
            if name not in scalars["step"]:
                continue
            # fused and capturable AdamW keep "step" on the parameter's device, the others on the CPU
            group = self.optimizer.param_groups[0]
            on_device = group.get("fused") or group.get("capturable")
            self.optimizer.state[parameter] = {
                "step": torch.tensor(
                    scalars["step"][name], dtype=torch.float32, device=parameter.device if on_device else "cpu"
                ),
                "exp_avg": torch.from_numpy(arrays[f"{name}.exp_avg"].copy()).to(parameter.device),
                "exp_avg_sq": torch.from_numpy(arrays[f"{name}.exp_avg_sq"].copy()).to(parameter.device),
            }
        if self.scaler is not None and "grad_scaler" in scalars:
            self.scaler.load_state_dict(scalars["grad_scaler"])

    def rng_state(self) -> dict[str, np.ndarray]:
        state = {"torch_cpu": torch.get_rng_state().numpy()}
        if self.device.type == "cuda":  # this process's GPU only: a resume may see another number of GPUs
            state["torch_cuda"] = torch.cuda.get_rng_state(self.device).numpy()
        elif self.device.type == "mps":
            state["torch_mps"] = torch.mps.get_rng_state().numpy()
        return state

    def set_rng_state(self, state: dict[str, np.ndarray]) -> None:
        torch.set_rng_state(torch.from_numpy(state["torch_cpu"].copy()))
        if self.device.type == "cuda" and "torch_cuda" in state:
            torch.cuda.set_rng_state(torch.from_numpy(state["torch_cuda"].copy()), self.device)
        elif self.device.type == "mps" and "torch_mps" in state:
            torch.mps.set_rng_state(torch.from_numpy(state["torch_mps"].copy()))

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    # -- generation and reporting -----------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        adapter: bool = True,
        stop_ids: list[int] | None = None,
        pad_id: int = 0,
        top_p: float = 1.0,
        top_k: int = 0,
        stream: Callable[[int, int], None] | None = None,
        seeds: list[int] | None = None,
        temperatures: list[float] | None = None,
        repetition_penalty: float = 1.0,
    ) -> list[list[int]]:
        from backends.torch_backend.generation import sample
        from core.sampling import sampling_rows

        self.model.eval()
        rows = sampling_rows(
            len(prompts),
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            seeds=seeds,
            temperatures=temperatures,
            repetition_penalty=repetition_penalty,
        )
        model = self.generation_model(adapter)
        with self._adapter_disabled(adapter) if model is self.model else contextlib.nullcontext(), self._autocast():
            return sample(
                model,
                prompts,
                rows,
                max_new_tokens=max_new_tokens,
                stop_ids=stop_ids or [],
                pad_id=pad_id,
                device=self.device,
                stream=stream,
            )

    @property
    def generation_dtype(self) -> str:
        """The precision answers are sampled in here (what ``sampling.precision`` resolved to)."""
        if resolve_generation_precision(self.generation_precision, self.device) == "bfloat16":
            return "bfloat16"
        return str(self.dtype).replace("torch.", "")

    def generation_model(self, adapter: bool) -> Any:
        """The model answers are sampled from. float32: the training model itself (the adapter switched on or
        off). bfloat16 on a CPU: a bf16 copy with the adapter merged into its weights (or left out): a decoding
        step reads every weight once, so half the bytes and no LoRA side-products make it about twice as fast
        where the CPU multiplies bf16 natively (AMX, AVX512-BF16). The copy is rebuilt when the adapter's
        weights change (a training step, a loaded adapter) and kept otherwise, one for each of on and off."""
        if resolve_generation_precision(self.generation_precision, self.device) != "bfloat16":
            return self.model
        lora = [p for n, p in self.model.named_parameters() if "lora_" in n]
        key = tuple((id(p), p._version) for p in lora) if adapter else ("base",)
        cached = self._generation_models.get(adapter)
        if cached is not None and cached[0] == key:
            return cached[1]
        self._generation_models.pop(adapter, None)  # free the stale copy before building the next
        copied = copy.deepcopy(self.model)
        plain = copied.merge_and_unload() if adapter and hasattr(copied, "merge_and_unload") else copied
        if not adapter and hasattr(copied, "unload"):
            plain = copied.unload()
        plain = plain.to(torch.bfloat16).eval()
        for parameter in plain.parameters():
            parameter.requires_grad_(False)
        self._generation_models[adapter] = (key, plain)
        return plain

    def info(self) -> BackendInfo:
        details: dict[str, Any] = {"torch": torch.__version__}
        if self.thread_choice is not None:  # the count now (auto may have moved it since the first choice)
            details["threads"] = self._governor.threads if self._governor else self.thread_choice.threads
            details["threads_source"] = self.thread_choice.source
        if self.device.type == "cuda":
            details["gpu"] = torch.cuda.get_device_name(self.device)
        return BackendInfo("torch", str(self.device), str(self.dtype).replace("torch.", ""), details)

    def memory(self) -> dict[str, float]:
        figures = {"peak_rss": peak_rss_bytes()}
        if self.device.type == "cuda":
            figures["peak_device"] = float(torch.cuda.max_memory_allocated(self.device))
            figures["device"] = float(torch.cuda.memory_allocated(self.device))
        elif self.device.type == "mps":
            figures["device"] = float(torch.mps.current_allocated_memory())
        return figures
