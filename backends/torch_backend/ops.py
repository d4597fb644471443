"""ArrayOps for torch tensors: the objectives in ``core.objectives`` run on these, with autograd."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from core.distributed import SINGLE, Collective
from core.objectives.ops import LOG1MEXP_FLOOR, MINUS_LN2


class TorchOps:
    def __init__(self, collective: Collective = SINGLE) -> None:
        self.collective = collective  # a torchrun job's processes, for mean_over_ranks

    def log_sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(x)

    def relu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean()

    def stop_gradient(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    def mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        if not self.collective.enabled:
            return x
        total = self.collective.sum(np.array([float(x.detach())]))[0]  # float64 on the host: one number
        return torch.tensor(total / self.collective.world_size, dtype=x.dtype, device=x.device)

    def greater(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a > b).to(a.dtype)

    def log1mexp(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(max=-LOG1MEXP_FLOOR)
        # both branches are finite for x < 0, so torch.where's gradient is too
        return torch.where(x > MINUS_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
