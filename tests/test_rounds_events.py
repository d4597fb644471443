"""What the rounds pass on from each round's training run (app/rounds.py's forwarder), without running one:
steps moved onto one axis, the run's own start and end left to the rounds, and a warning said once."""

from __future__ import annotations

from app.api import config_from_dict
from app.rounds import Rounds
from core.events import Event, Info, RunStarted, RunWarning, TrainStep


def test_steps_share_one_axis_and_a_warning_is_said_once() -> None:
    config = config_from_dict({"rounds": {"count": 2, "steps": 3}})
    seen: list[Event] = []
    rounds = Rounds(config, None, seen.append, None, [], [])  # type: ignore[arg-type]  # the forwarder uses none
    quantized = "the model was converted from a quantized GGUF file"
    for number in (1, 2):
        forward = rounds._forwarder(number)
        forward(RunStarted(message="training", total_steps=3))
        forward(RunWarning(message=quantized))
        forward(RunWarning(message=f"starting from the adapter of round {number - 1}"))
        forward(Info(message="padding: 10%"))
        forward(TrainStep(step=3, total_steps=3, eta=0.0))
    assert [type(event).__name__ for event in seen].count("RunStarted") == 0  # the rounds say their own
    warnings = [event.message for event in seen if isinstance(event, RunWarning)]
    assert warnings == [quantized, "starting from the adapter of round 0", "starting from the adapter of round 1"]
    assert [event.message for event in seen if isinstance(event, Info)] == ["padding: 10%"] * 2  # not warnings
    assert [(event.step, event.total_steps) for event in seen if isinstance(event, TrainStep)] == [(3, 6), (6, 6)]
