"""The backend contract, as backends import it. It lives in the library (`core.backend`), which the trainer
and checkpoints use without knowing any implementation; backends are found through `app.backends`."""

from core.backend import (
    CHUNK_LOGITS,
    Backend,
    BackendError,
    BackendInfo,
    BackendPlugin,
    StepResult,
    UpdateResult,
    chunk_positions,
    is_apple_silicon,
    peak_rss_bytes,
)

__all__ = [
    "CHUNK_LOGITS",
    "Backend",
    "BackendError",
    "BackendInfo",
    "BackendPlugin",
    "StepResult",
    "UpdateResult",
    "chunk_positions",
    "is_apple_silicon",
    "peak_rss_bytes",
]
