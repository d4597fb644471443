"""Running under torchrun: one process per device, each training on its shard of every global batch.

``Collective`` is what the backend-agnostic code needs from the other processes: sums, gathers, a shared
decision to stop, a barrier. Outside torchrun it is the identity (one process, rank 0), so the trainer is
written once for both. Under torchrun it wraps ``torch.distributed``: gloo on the CPU, NCCL on CUDA,
with a timeout, so a rank that dies makes the others fail instead of hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import DuetError


class DistributedError(DuetError):
    """The process group could not be formed, or a torchrun setting is inconsistent."""


def torchrun_environment() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun (even as one process, so ``--nproc_per_node 1``
    goes through the process group and DistributedDataParallel as a multi-GPU job would), else None. Another
    launcher's WORLD_SIZE=1 is one plain process."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0))


@dataclass(frozen=True)
class Collective:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = None  # where collective tensors live: CPU for gloo, the rank's GPU for NCCL
    launched: bool = False  # a process group exists (torchrun), even of one process

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's contiguous share of ``items`` (sizes differ by at most one)."""
        if not self.enabled:
            return items
        bounds = np.linspace(0, len(items), self.world_size + 1).round().astype(int)
        return items[bounds[self.rank] : bounds[self.rank + 1]]

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks (float64)."""
        values = np.asarray(values, dtype=np.float64)
        if not self.enabled:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(values.copy()).to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Every rank's rows (a [n, k] float64 array, n differing by rank and possibly 0), concatenated in rank
        order."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2:  # numbers are one-column rows (np.reshape cannot infer a width from 0 rows)
            rows = rows.reshape(-1, 1) if rows.ndim == 1 else rows.reshape(len(rows), -1)
        if not self.enabled:
            return rows
        import torch
        import torch.distributed as dist

        counts = self.sum(np.eye(self.world_size)[self.rank] * len(rows)).astype(int)
        widths = self.sum(np.eye(self.world_size)[self.rank] * rows.shape[1]).astype(int)
        if len({int(w) for w, n in zip(widths, counts, strict=True) if n}) > 1:
            raise DistributedError(f"ranks gathered rows of different widths: {widths.tolist()}")
        width = int(max((w for w, n in zip(widths, counts, strict=True) if n), default=rows.shape[1]))
        padded = np.zeros((int(counts.max()), width))
        padded[: len(rows)] = rows
        pieces = [torch.zeros(padded.shape, dtype=torch.float64, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(pieces, torch.from_numpy(padded).to(self.device))
        return np.concatenate([p.cpu().numpy()[:n] for p, n in zip(pieces, counts, strict=True)])

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any: decisions (stop now) all ranks must take together."""
        return bool(self.sum(np.array([1.0 if flag else 0.0]))[0] > 0)

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's string, on every rank."""
        if not self.enabled:
            return text or ""
        data = np.frombuffer((text or "").encode(), dtype=np.uint8) if self.is_main else np.zeros(0, np.uint8)
        size = int(self.sum(np.array([len(data) if self.is_main else 0]))[0])
        buffer = np.zeros(size)
        buffer[: len(data)] = data
        return bytes(self.sum(buffer).astype(np.uint8)).decode()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Collective()


def init_distributed(device_choice: str, timeout_seconds: float) -> tuple[Collective, str]:
    """Form the process group when launched by torchrun. Returns the collective and the torch device to train
    on ("cuda:<local rank>" with NCCL, "cpu" with gloo); outside torchrun, (SINGLE, device_choice)."""
    environment = torchrun_environment()
    if environment is None:
        return SINGLE, device_choice
    import torch
    import torch.distributed as dist

    rank, world, local_rank = environment
    use_cuda = device_choice in ("auto", "cuda") and torch.cuda.is_available()
    if device_choice == "cuda" and not use_cuda:
        raise DistributedError("model.device=cuda under torchrun, but torch sees no CUDA GPU on this node.")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local_rank}, but this node has {torch.cuda.device_count()} GPUs: lower --nproc_per_node."
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
    return Collective(rank, world, local_rank, torch.device(device), launched=True), device


def shutdown_distributed(collective: Collective) -> None:
    if collective.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
