"""SIGINT and SIGTERM during a run: stop after the step, with a checkpoint."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from typing import Any

from core.trainer import RunControl


@contextlib.contextmanager
def stop_on_signals(control: RunControl, say: Callable[[str], None], enabled: bool):
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save); a second one quits at once."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if control.stop_requested:
            raise KeyboardInterrupt
        control.request_stop(f"received {signal.Signals(signum).name}")
        say("stopping after this step and saving a checkpoint (Ctrl-C again quits at once; nothing is corrupted)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
