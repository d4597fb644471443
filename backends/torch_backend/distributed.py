"""torchrun for the torch backend: the process group (gloo on the CPU, NCCL on CUDA, with a timeout, so a
rank that dies makes the others fail instead of hang) and the `Collective` transport over it."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from core.distributed import SINGLE, Collective, DistributedError, torchrun_environment


@dataclass(frozen=True)
class TorchCollective(Collective):
    """Sums, gathers and barriers through ``torch.distributed``, on the rank's device (CPU for gloo)."""

    def _all_reduce(self, values: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(values.copy()).to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def _all_gather(self, rows: np.ndarray) -> list[np.ndarray]:
        pieces = [torch.zeros(rows.shape, dtype=torch.float64, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(pieces, torch.from_numpy(rows).to(self.device))
        return [piece.cpu().numpy() for piece in pieces]

    def _barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def join_job(device_choice: str, timeout_seconds: float) -> tuple[Collective, str]:
    """Form the process group when launched by torchrun. Returns the collective and the torch device to train
    on ("cuda:<local rank>" with NCCL, "cpu" with gloo); outside torchrun, (SINGLE, device_choice)."""
    environment = torchrun_environment()
    if environment is None:
        return SINGLE, device_choice
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
    return TorchCollective(rank, world, local_rank, torch.device(device), launched=True), device
