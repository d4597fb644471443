"""SIGINT and SIGTERM during a run: stop after the step, with a checkpoint; a second one quits at once."""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from core.trainer import RunControl

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_STOP_WATCHING = b"\0"  # no signal has the number 0


@contextlib.contextmanager
def stop_on_signals(control: RunControl, say: Callable[[str], None], enabled: bool) -> Iterator[None]:
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save); a second one quits at once.

    Python runs a signal's handler only between bytecodes of the main thread, and two signals that land
    while it sits in one long native call (a big matmul) reach that handler once: the second Ctrl-C would be
    lost and the first would say nothing until the call returns. So the C-level handler's wake-up byte,
    written for every delivery, is read by a watcher thread, which answers the first at once and makes the
    main thread raise KeyboardInterrupt on the second."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    signalled, quit_now, unwinding = threading.Event(), threading.Event(), threading.Event()

    def handler(signum: int, frame: Any) -> None:
        # raised once: the real signal and the watcher's interrupt_main may reach this handler separately
        if quit_now.is_set() and not unwinding.is_set():
            unwinding.set()
            raise KeyboardInterrupt

    def answer(signum: int) -> None:
        if control.stop_requested:
            quit_now.set()
            _thread.interrupt_main(signum)
            return
        signalled.set()
        control.request_stop(f"received {signal.Signals(signum).name}")
        # a console that is gone (stdout piped into `head`) must not end the watcher: Ctrl-C would go deaf
        with contextlib.suppress(OSError):
            say("stopping after this step and saving a checkpoint (Ctrl-C again quits at once; nothing is corrupted)")

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = {s: signal.signal(s, handler) for s in _SIGNALS}
    previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read_end, answer), name="duet-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        os.write(write_end, _STOP_WATCHING)
        watcher.join()
        os.close(read_end)
        os.close(write_end)
        # Once a person has asked to stop, a second Ctrl-C must still quit at once after the run's last
        # save, while the interpreter winds down; the default handler would raise KeyboardInterrupt in
        # whatever finalizer happens to run then and print its traceback.
        after = _quit_now if signalled.is_set() else None
        for sig, old in previous.items():
            signal.signal(sig, after or old)


def _watch(read_end: int, answer: Callable[[int], None]) -> None:
    """Answer each signal the C handler recorded, in order, until told to stop watching."""
    while True:
        for signum in os.read(read_end, 64):  # a signal landing on this read is retried (PEP 475)
            if signum == 0:
                return
            if signum in _SIGNALS:
                answer(signum)


def _quit_now(signum: int, frame: Any) -> None:
    """The run has saved everything it will: leave without unwinding, with the shell's code for a signal."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        os.write(2, b"interrupted at once; the newest checkpoint is intact.\n")
    os._exit(128 + signum)
