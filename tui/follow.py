"""Follow a run's ``metrics.jsonl`` as it grows: new complete lines only, a restart when it is truncated
(a resumed run cuts it back to its checkpoint, and may have written past the old end before the next read:
the bytes just before the offset are compared too), and whether a process is still running the run."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

from app.api import LOCK_FILE, METRICS_FILE, parse_events

TAIL = 256  # bytes compared to tell a file that only grew from one cut back and rewritten


class MetricsFollower:
    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.offset = 0
        self._partial = b""
        self._tail = b""  # the last bytes read: still there unless the file was cut back and rewritten

    def poll(self) -> tuple[list[dict[str, Any]], bool]:
        """(new events, whether the file was truncated so the reader must start over)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return [], False
        restarted = size < self.offset
        if size == self.offset and not restarted:
            return [], False
        with open(self.path, "rb") as handle:
            if not restarted and self._tail:
                handle.seek(self.offset - len(self._tail))
                restarted = handle.read(len(self._tail)) != self._tail
            if restarted:
                self.offset, self._partial, self._tail = 0, b"", b""
            handle.seek(self.offset)
            data = handle.read(max(0, size - self.offset))
        self.offset += len(data)
        self._tail = (self._tail + data)[-TAIL:]
        complete, _, self._partial = (self._partial + data).rpartition(b"\n")  # a last line waits for its end
        return parse_events(complete), restarted

    def is_running(self) -> bool | None:
        """True when a process holds the run's lock, False when none does, None when there is no run yet."""
        lock = self.run_dir / LOCK_FILE
        if not lock.exists():
            return None
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
