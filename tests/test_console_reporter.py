"""The console's live progress line ends with the run: nothing stale is drawn after its last message."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from core.events import event_from_json as event
from core.metrics import ConsoleReporter

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.parametrize(
    "last",
    [
        {"type": "stopped", "step": 3, "message": "stopped at step 3/10 (interrupted); resume with: x"},
        {"type": "error", "message": "interrupted; the newest checkpoint is intact"},
        {"type": "end", "step": 10, "message": "done: the adapter is in runs/x/adapter"},
    ],
    ids=lambda event: event["type"],
)
def test_the_last_message_is_the_last_line_on_a_terminal(last: dict) -> None:
    output = io.StringIO()
    reporter = ConsoleReporter(Console(file=output, force_terminal=True, width=100))
    reporter(event({"type": "start", "message": "training", "total_steps": 10}))
    for step in (1, 2, 3):
        reporter(event({"type": "train", "step": step, "total_steps": 10, "loss": 0.5}))
    reporter(event(last))
    reporter.close()
    screen = [line.rsplit("\r", 1)[-1] for line in ANSI.sub("", output.getvalue()).splitlines()]
    shown = [line for line in screen if line.strip()]
    assert shown[-1].endswith(last["message"]), shown[-3:]
    assert shown[-2].startswith("step 3/10")  # the final state of the bar, drawn once, above the message
