"""The MLX backend (Apple silicon; CPU on Linux): mlx + mlx-lm."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.backend import BackendError, BackendPlugin, is_apple_silicon

if TYPE_CHECKING:
    from core.backend import Backend
    from core.config import Config
    from core.distributed import Collective


def create(config: Config, collective: Collective, device: str | None) -> Backend:
    try:
        from backends.mlx_backend.backend import MlxBackend
    except ImportError as exc:
        raise BackendError(
            f"the MLX backend cannot run here: {exc}. Install mlx and mlx-lm "
            "(pip install 'mlx[cpu]' mlx-lm on Linux), or set model.backend=torch."
        ) from None
    return MlxBackend(
        dtype=config.model.dtype,
        gradient_checkpointing=config.model.gradient_checkpointing,
        chunk_size=config.model.logprob_chunk_size,
        share_prompts=config.model.share_prompts,
    )


def auto_preference() -> int:
    """First choice on Apple silicon when it imports; never `auto`'s choice elsewhere (Linux's CPU build is slow)."""
    if not is_apple_silicon():
        return 0
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return 0
    return 2


plugin = BackendPlugin("mlx", create, auto_preference, "MLX: Apple silicon (a slow CPU build on Linux)")
