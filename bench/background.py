"""A stated background load for `duet bench --background-load N`: N processes that each keep one core busy
for as long as a measurement runs, so a benchmark can say how a variant behaves on a busy machine."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

# a pure Python busy loop: one core at 100%, no memory traffic, no threads of its own (a numpy loop would
# bring BLAS threads and measure their contention too)
SPIN = "while True: pass"


def describe(count: int, from_step: int | None = None) -> str:
    if count == 0:
        return "none (idle machine)"
    when = f", started when step {from_step} begins" if from_step else ""
    return f"{count} spinning Python process{'es' if count != 1 else ''} ({SPIN!r}){when}"


@contextlib.contextmanager
def background_load(count: int) -> Iterator[list[subprocess.Popen]]:
    """Start ``count`` spinning processes, and stop exactly those when the block ends (even on an error)."""
    spinners: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            spinners.append(subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL))
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()
