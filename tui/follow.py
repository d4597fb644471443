"""Follow a run's ``metrics.jsonl`` as it grows: new complete lines only, a restart when it is truncated
(a resumed run cuts it back to its checkpoint), and whether a process is still running the run."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

from core.rundir import LOCK_FILE, METRICS_FILE


class MetricsFollower:
    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.offset = 0
        self._partial = b""

    def poll(self) -> tuple[list[dict[str, Any]], bool]:
        """(new events, whether the file was truncated so the reader must start over)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return [], False
        restarted = size < self.offset
        if restarted:
            self.offset, self._partial = 0, b""
        if size == self.offset:
            return [], restarted
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(size - self.offset)
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the rest of it
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a torn line from a killed writer
            if isinstance(event, dict):
                events.append(event)
        return events, restarted

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
