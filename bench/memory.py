"""Process memory for benchmarks: current and peak resident memory, with the peak reset before measuring.

Linux keeps a high-water mark (VmHWM) that writing 5 to /proc/self/clear_refs resets, so the peak of the
training steps is measured apart from model construction. Elsewhere the lifetime peak (ru_maxrss) is all
there is, and the report says so.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset the peak to the current resident size; False where the system cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_bytes() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024.0


def peak_bytes() -> float:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)
