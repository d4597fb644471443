"""Running under torchrun: one process per device, each training on its shard of every global batch.

``Collective`` is what the backend-agnostic code needs from the other processes: sums, gathers, a shared
decision to stop, a barrier, all on NumPy arrays. Outside torchrun it is the identity (`SINGLE`: one
process, rank 0), so the trainer is written once for both. A backend that trains under torchrun subclasses
it with its transport (the torch backend's ``torch.distributed``); the library never imports one.
"""

from __future__ import annotations

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
    """One process's view of the job. Subclasses that span processes implement `_all_reduce`,
    `_all_gather` and `_barrier`; everything else is written once on top of them."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = None  # where the transport's buffers live (a backend's own device object)
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
        return self._all_reduce(values) if self.enabled else values

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Every rank's rows (a [n, k] float64 array, n differing by rank and possibly 0), concatenated in rank
        order."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2:  # numbers are one-column rows (np.reshape cannot infer a width from 0 rows)
            rows = rows.reshape(-1, 1) if rows.ndim == 1 else rows.reshape(len(rows), -1)
        if not self.enabled:
            return rows
        counts = self.sum(np.eye(self.world_size)[self.rank] * len(rows)).astype(int)
        widths = self.sum(np.eye(self.world_size)[self.rank] * rows.shape[1]).astype(int)
        if len({int(w) for w, n in zip(widths, counts, strict=True) if n}) > 1:
            raise DistributedError(f"ranks gathered rows of different widths: {widths.tolist()}")
        width = int(max((w for w, n in zip(widths, counts, strict=True) if n), default=rows.shape[1]))
        padded = np.zeros((int(counts.max()), width))  # every rank sends the same shape
        padded[: len(rows)] = rows
        pieces = self._all_gather(padded)
        return np.concatenate([piece[:n] for piece, n in zip(pieces, counts, strict=True)])

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
            self._barrier()

    def close(self) -> None:
        """Leave the job (the process group is torn down); nothing to do for one process."""

    # -- the transport: only called when `enabled` ------------------------------------------------------

    def _all_reduce(self, values: np.ndarray) -> np.ndarray:
        raise DistributedError(f"{type(self).__name__} spans {self.world_size} processes but has no transport")

    def _all_gather(self, rows: np.ndarray) -> list[np.ndarray]:
        raise DistributedError(f"{type(self).__name__} spans {self.world_size} processes but has no transport")

    def _barrier(self) -> None:
        raise DistributedError(f"{type(self).__name__} spans {self.world_size} processes but has no transport")


SINGLE = Collective()
