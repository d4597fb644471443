"""The contract every backend implements, and how a backend makes itself known.

The library never touches torch or MLX: it hands a backend plain NumPy batches and gets plain floats and
NumPy arrays back. A backend owns the model, its LoRA adapter, the optimizer and the hot kernels. Backends
register a `BackendPlugin` under the ``duet.backends`` entry-point group (see pyproject.toml), so a
third-party backend installs as a plugin; the application layer (``app.backends``) discovers them.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.batching import Batch
from core.config import Config, LoraConfig
from core.distributed import Collective
from core.errors import DuetError
from core.objectives import Objective
from core.objectives.ops import ArrayOps


class BackendError(DuetError):
    """A backend that cannot run here, or cannot do what was asked."""


@dataclass
class StepResult:
    """What one forward(/backward) over a batch reports back, as plain numbers."""

    metrics: dict[str, float]  # the objective's metrics (TRL names), means over the batch's pairs
    margins: np.ndarray  # [B] per-pair reward margins (chosen - rejected), for the histogram
    num_pairs: int
    num_tokens: int  # real tokens in the batch (both sequences of each pair)


@dataclass
class UpdateResult:
    grad_norm: float  # before clipping
    applied: bool  # False when the gradient was not finite and the update was skipped
    # fp16 loss scaling overflowed: an expected event (the scale is lowered and the step skipped), not a fault
    overflow: bool = False


@dataclass
class BackendInfo:
    name: str
    device: str
    dtype: str
    details: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """Model loading, LoRA, the masked log-prob kernel, reference log-probs, optimizer, adapter I/O, generation."""

    name: str
    ops: ArrayOps
    tokenizer: Any
    # what the loaded model's config says that this backend cannot honour exactly (shown as run warnings)
    config_warnings: list[str] = []  # noqa: RUF012 - never mutated: a backend assigns its own list

    # -- model and adapter ------------------------------------------------------------------------------

    @abstractmethod
    def load_model(self, path: str, *, trust_remote_code: bool = False) -> None:
        """Load the base model and its tokenizer from a local folder or a hub id."""

    @abstractmethod
    def attach_lora(self, lora: LoraConfig, adapter_path: str | None = None) -> None:
        """Add LoRA to the target modules: freshly initialized, or loaded from ``adapter_path``."""

    @abstractmethod
    def trainable_parameters(self) -> int: ...

    @abstractmethod
    def total_parameters(self) -> int: ...

    # -- compute ----------------------------------------------------------------------------------------

    @abstractmethod
    def sequence_logps(self, batch: Batch, *, adapter: bool = True) -> np.ndarray:
        """Summed response log-probs per row ([2B]), no gradient; ``adapter=False`` gives the base model."""

    @abstractmethod
    def forward_backward(
        self,
        batch: Batch,
        objective: Objective,
        reference: np.ndarray | None,
        nll_weight: float,
        scale: float,
        sync: bool = True,
    ) -> StepResult:
        """Policy forward and backward on one micro-batch; gradients of ``scale`` × loss accumulate. Under
        torchrun, ``sync`` (the step's last micro-batch) is when gradients are averaged across ranks."""

    @abstractmethod
    def evaluate(
        self, batch: Batch, objective: Objective, reference: np.ndarray | None, nll_weight: float
    ) -> StepResult:
        """The objective on a batch with no gradient (eval mode)."""

    @abstractmethod
    def setup_optimizer(
        self, *, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None: ...

    @abstractmethod
    def apply_gradients(self, lr: float, max_grad_norm: float | None) -> UpdateResult:
        """Clip, check finiteness, step AdamW at ``lr`` and clear gradients. A non-finite gradient is not applied."""

    @abstractmethod
    def discard_gradients(self) -> None:
        """Drop the accumulated gradients without an update (a step whose loss was not finite)."""

    def between_steps(self) -> tuple[int, str] | None:
        """After each optimizer step: a backend may adapt to the machine here. (threads, why) when it moved
        its CPU thread count since the run last logged one (torch on a CPU under ``model.threads=auto``, as
        other processes come and go), else None. The trainer logs it; a resumed run continues from it."""
        return None

    def continue_threads(self, threads: int) -> None:
        """A resumed run: go on with the CPU thread count the run had at its checkpoint, where the backend
        chooses the count itself (``model.threads=auto``); otherwise nothing."""
        return None

    # -- state ------------------------------------------------------------------------------------------

    @abstractmethod
    def adapter_weights(self) -> dict[str, np.ndarray]:
        """The LoRA weights under PEFT's key names (``base_model.model....lora_A.weight``), as float32."""

    @abstractmethod
    def save_adapter(self, directory: Path) -> None:
        """Write the adapter in this backend's native format into an existing, empty folder."""

    @abstractmethod
    def load_adapter(self, directory: Path) -> None:
        """Load adapter weights written by ``save_adapter`` into the attached LoRA layers."""

    @abstractmethod
    def optimizer_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, JSON-able scalars) that restore the optimizer exactly."""

    @abstractmethod
    def load_optimizer_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None: ...

    @abstractmethod
    def rng_state(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def set_rng_state(self, state: dict[str, np.ndarray]) -> None: ...

    @abstractmethod
    def seed(self, seed: int) -> None: ...

    # -- generation and reporting -----------------------------------------------------------------------

    @abstractmethod
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
        """Token ids generated after each prompt (ids, template applied), stopping at ``stop_ids``; with the
        adapter on or off. Sampling (``temperature`` > 0, nucleus ``top_p``, ``top_k``; 0: no limit) is seeded
        per row (``seeds[i]``, else ``seed + i``; ``temperatures[i]`` overrides ``temperature``): a row's answer
        depends on its prompt, seed and settings, not on the rest of the batch, and the training RNG is left
        untouched. ``repetition_penalty`` > 1 divides the logit of every token already in the row's prompt or
        answer by it (multiplies a negative one), as transformers does. ``stream(row, token)`` is called for
        each token as it is made."""

    @abstractmethod
    def info(self) -> BackendInfo: ...

    def memory(self) -> dict[str, float]:
        """Memory figures in bytes (peak and current where known)."""
        return {"peak_rss": peak_rss_bytes()}


CHUNK_LOGITS = 1 << 25  # logits one kernel chunk may hold: [positions, vocab], 128 MiB in float32


def chunk_positions(setting: int | str, vocab_size: int) -> int:
    """Reply positions per LM-head chunk: the configured number, or for "auto" the largest power of two
    whose ``[positions, vocab]`` logits stay within `CHUNK_LOGITS` (between 32 and 4096). Larger chunks
    save little time once the head's matrix product is big enough to run at full speed, and cost memory."""
    if setting != "auto":
        return int(setting)
    fit = max(1, CHUNK_LOGITS // max(1, vocab_size))
    return min(4096, max(32, 1 << (fit.bit_length() - 1)))


def peak_rss_bytes() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)


@dataclass(frozen=True)
class BackendPlugin:
    """What a backend registers: its name, how to build it from a config (importing its heavy modules only
    then), and how much ``model.backend: auto`` should prefer it on this machine (0: never)."""

    name: str
    create: Callable[[Config, Collective, str | None], Backend]
    auto_preference: Callable[[], int]
    summary: str = ""
    # under torchrun: forms the process group from (model.device, timeout in seconds) and returns this rank's
    # collective and device; None for a backend that does not train under torchrun
    join_job: Callable[[str, float], tuple[Collective, str]] | None = None

    @property
    def distributed(self) -> bool:
        return self.join_job is not None


def is_apple_silicon() -> bool:
    import platform

    return sys.platform == "darwin" and platform.machine() == "arm64"


def check_adapter_fits(
    directory: object, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], extra: list[str] = ()
) -> None:
    """Raise a clear error when an adapter's tensors (``found``: name → shape, in this backend's naming) do not
    fit the LoRA layers attached (``expected``); ``extra`` names tensors it has where this model has no LoRA."""
    missing = sorted(set(expected) - set(found))
    wrong = sorted(k for k in expected.keys() & found.keys() if tuple(found[k]) != tuple(expected[k]))
    if not (missing or extra or wrong):
        return
    if missing:
        problem = f"it lacks {missing[0]}"
    elif extra:
        problem = f"it has {sorted(extra)[0]}, which this model has no LoRA on"
    else:
        problem = f"{wrong[0]} has shape {tuple(found[wrong[0]])}, this model needs {tuple(expected[wrong[0]])}"
    raise BackendError(
        f"{directory}: the adapter does not fit this model and LoRA settings: {problem}. Use "
        "the base model and LoRA settings it was trained with (see its adapter_config.json)."
    )
