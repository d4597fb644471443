"""SIGINT and SIGTERM during a run: stop after the step, with a checkpoint."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
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

    signalled = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal signalled
        if control.stop_requested:
            raise KeyboardInterrupt
        signalled = True
        control.request_stop(f"received {signal.Signals(signum).name}")
        say("stopping after this step and saving a checkpoint (Ctrl-C again quits at once; nothing is corrupted)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        # Once a person has asked to stop, a second Ctrl-C must still quit at once after the run's last
        # save, while the interpreter winds down; the default handler would raise KeyboardInterrupt in
        # whatever finalizer happens to run then and print its traceback.
        after = _quit_now if signalled else None
        for sig, old in previous.items():
            signal.signal(sig, after or old)


def _quit_now(signum: int, frame: Any) -> None:
    """The run has saved everything it will: leave without unwinding, with the shell's code for a signal."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        os.write(2, b"interrupted at once; the newest checkpoint is intact.\n")
    os._exit(128 + signum)
