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


def test_in_a_log_each_rounds_last_step_is_a_line() -> None:
    """Rounds put every round's steps on one axis (1-12 of 24, then 13-24): the line of a round's last step
    (eta 0) is written even when it comes sooner than the reporter's interval, as a run's last step is."""
    output = io.StringIO()
    reporter = ConsoleReporter(Console(file=output, force_terminal=False, width=100), every_seconds=3600)
    for step in range(1, 13):
        eta = 0.0 if step == 12 else 5.0 * (12 - step)
        reporter(event({"type": "train", "step": step, "total_steps": 24, "loss": 0.5, "eta": eta}))
    lines = output.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/24", "12/24"]


def test_in_a_log_a_long_phase_says_how_far_it_has_got() -> None:
    """A phase's progress in a log is a line of words (count, elapsed, ETA), never an empty line; the rounds'
    sampling and held-out answers report through PhaseProgress like every other phase."""
    from app.rounds import Rounds
    from core.progress import PhaseProgress

    output = io.StringIO()
    reporter = ConsoleReporter(Console(file=output, force_terminal=False, width=100), every_seconds=0)
    clock = iter(float(t) for t in range(100))
    progress = PhaseProgress(
        reporter, "evaluate", "held-out answers of the base model", 0, unit="prompts", clock=lambda: next(clock)
    )
    for done in range(1, 4):
        progress(done, 3)
    lines = output.getvalue().splitlines()
    assert lines and all(line.startswith("held-out answers of the base model: ") for line in lines), lines
    assert "ETA" in lines[0]
    rounds = Rounds.__new__(Rounds)  # the method alone: what the rounds hand their phases
    rounds.emit = reporter
    assert isinstance(rounds._progress("sample", "round 1: sample and judge", "prompts"), PhaseProgress)
