"""Fault injection for the reliability suite: kill the process at a named point of a write or a step.

Set ``DUET_FAULT=<point>:<n>`` to have the process SIGKILL itself the n-th time it reaches ``<point>``
(n counts from 1). Unset, ``reach`` is a dictionary lookup and a compare: nothing a user would notice.
The points sit where a crash would hurt most: half-way through writing a file, between the files of a
checkpoint, just before a rename, in the middle of a metrics line.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_SPEC = os.environ.get("DUET_FAULT", "")
# DUET_FAULT_RANK=r: only the torchrun worker of rank r fails (a node dying under a multi-process job)
if os.environ.get("DUET_FAULT_RANK") not in (None, os.environ.get("RANK", "0")):
    _SPEC = ""
_POINT, _, _COUNT = _SPEC.partition(":")
_TARGET = int(_COUNT) if _COUNT.isdigit() else 1
_seen: Counter[str] = Counter()


def armed(point: str) -> bool:
    """True exactly when this visit to ``point`` is the one to fail (counts the visit)."""
    if not _POINT or point != _POINT:
        return False
    _seen[point] += 1
    return _seen[point] == _TARGET


def reach(point: str) -> None:
    """Die here, at once and without cleanup, when this is the armed point."""
    if armed(point):
        reach_now()


def reach_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
