"""The PyTorch backend (CUDA, MPS, CPU): transformers + PEFT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.backend import BackendPlugin

if TYPE_CHECKING:
    from core.backend import Backend
    from core.config import Config
    from core.distributed import Collective


def create(config: Config, collective: Collective, device: str | None) -> Backend:
    from backends.torch_backend.backend import TorchBackend

    return TorchBackend(
        collective=collective,
        device=device or config.model.device,
        dtype=config.model.dtype,
        gradient_checkpointing=config.model.gradient_checkpointing,
        chunk_size=config.model.logprob_chunk_size,
        share_prompts=config.model.share_prompts,
        padding_free=config.model.padding_free,
        generation_precision=config.sampling.precision,
        threads=config.model.threads,
        host_memory=config.model.host_memory,
    )


# torch runs everywhere: what `auto` takes when nothing suits the machine better
def join_job(device_choice: str, timeout_seconds: float) -> tuple[Collective, str]:
    from backends.torch_backend.distributed import join_job

    return join_job(device_choice, timeout_seconds)


plugin = BackendPlugin("torch", create, lambda: 1, "PyTorch: CUDA, then MPS, then CPU", join_job=join_job)
