"""Host memory behaviour for CPU training (``model.host_memory``).

Every activation of a step is a fresh allocation of a few MB. glibc's malloc serves blocks above its mmap
threshold from their own mappings, returned to the system when freed; smaller ones from its heap, where
freed blocks wait for the next request of a size that fits. Its default threshold starts at 128 KiB and
rises after large blocks are freed, so a run drifts from one regime to the other.

- ``lean`` fixes the threshold at 1 MiB: each activation-sized block is its own mapping, handed back as
  soon as it is freed, so the resident size follows what is live. Each block is then paid for again at
  every step: a mapping, a page fault per 4 KiB page while it is first written, and the unmapping.
- ``fast`` fixes it at 32 MiB (glibc's ceiling): activation blocks come from the heap and are reused by the
  next step, with no faults, at the price of the heap's fragmentation, which the peak keeps.

On SmolLM2-135M (fp32; docs/benchmarks.md, "page faults ... and model.host_memory") ``fast`` ran whole
bench runs in 0.70-0.79× ``lean``'s time at a 1.2× peak; on the head-bound qwen-small it changed nothing but
memory (+13%). ``lean`` is the default: a run that fits under it could be killed for memory under ``fast``,
with no message. DUET_GLIBC_DEFAULT_MMAP=1 leaves glibc's own policy alone.

A pass without gradients (the reference pass, evaluation) keeps nothing for a backward: each layer's blocks
are freed before the next layer asks for the same sizes. ``heap_reuse`` serves such a pass from the heap
under ``lean`` too and hands the pages back when it ends, so it runs at ``fast``'s speed for a peak of a few
layers' blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
THRESHOLDS = {"lean": 1 << 20, "fast": 32 << 20}
_applied: str | None = None
_LIBC: ctypes.CDLL | bool | None = False  # False until looked up: finding it takes a millisecond, steps need it


def _libc() -> ctypes.CDLL | None:
    """glibc, where this process runs on it and may change its policy; None elsewhere."""
    global _LIBC
    if not sys.platform.startswith("linux") or os.environ.get("DUET_GLIBC_DEFAULT_MMAP"):
        return None
    if _LIBC is False:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018 (musl has neither)
        except (OSError, AttributeError):
            libc = None
        _LIBC = libc
    return _LIBC  # type: ignore[return-value]


def configure_host_memory(mode: str = "lean") -> bool:
    """Fix glibc's mmap threshold for ``mode`` ("lean" or "fast"); False where there is no glibc (macOS,
    musl) or DUET_GLIBC_DEFAULT_MMAP is set. Process-wide: the last backend made decides."""
    global _applied
    if mode not in THRESHOLDS:
        raise ValueError(f"model.host_memory={mode!r}: use lean or fast")
    if _applied == mode:
        return True
    libc = _libc()
    if libc is None:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLDS[mode]))
    _applied = mode if done else None
    return done


@contextlib.contextmanager
def heap_reuse() -> Iterator[None]:
    """Under ``lean``, serve a pass without gradients from the heap (``fast``'s threshold), then give its
    freed pages back (``malloc_trim``) and return to ``lean``. Elsewhere it changes nothing."""
    libc = _libc() if _applied == "lean" else None
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, THRESHOLDS["fast"]):
        yield
        return
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, THRESHOLDS["lean"])
        libc.malloc_trim(0)


def give_back_free_heap() -> bool:
    """Under ``lean``, hand the heap's free pages back to the system (``malloc_trim``): the small blocks a step
    frees (under the threshold, so in the heap) are otherwise kept, scattered, and the resident size creeps
    up step by step. False where nothing was done."""
    libc = _libc() if _applied == "lean" else None
    return bool(libc is not None and libc.malloc_trim(0))
