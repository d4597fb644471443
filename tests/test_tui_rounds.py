"""The dashboard and `duet watch` on a rounds run: the steps of every round on one axis, where each round
begins marked on the charts, and the round, its phase and the last round's win rates in the status line."""

from __future__ import annotations

from pathlib import Path

from core.events import Event, Info, RoundReport, TrainStep
from core.metrics import MetricsLog
from tui.app import DuetApp
from tui.dashboard import DashboardScreen
from tui.state import DashboardState
from tui.widgets import status_lines


def rounds_events() -> list[Event]:
    events: list[Event] = [Info(message="3 rounds in runs/r: 56 training prompts, 48 held out")]
    for number in (1, 2):
        offset = (number - 1) * 10
        events.append(RoundReport(round=number, rounds=3, phase="sample", step_offset=offset, message="sampling"))
        events.append(RoundReport(round=number, rounds=3, phase="train", step_offset=offset, pairs=20, message="t"))
        for step in range(1, 11):
            metrics = {"loss": 0.7 - 0.01 * (offset + step), "rewards/margins": 0.1, "rewards/accuracies": 0.5}
            events.append(TrainStep(step=offset + step, total_steps=30, metrics=metrics, learning_rate=1e-3))
        events.append(
            RoundReport(
                round=number,
                rounds=3,
                phase="done",
                step_offset=offset,
                win_rate_vs_base=0.5 + 0.05 * number,
                win_rate_vs_previous=0.5 + 0.04 * number,
                message=f"round {number}/3: win rate ...",
            )
        )
    events.append(RoundReport(round=3, rounds=3, phase="sample", step_offset=20, message="round 3/3: sampling"))
    return events


def test_the_status_line_shows_the_round_and_the_last_win_rates() -> None:
    state = DashboardState()
    for event in rounds_events():
        state.apply(event)
    assert state.round_starts == {10, 20} and state.step == 20 and state.total_steps == 30
    assert state.train["loss"].steps == list(range(1, 21))
    for width in (80, 120):
        lines = [line.plain for line in status_lines(state, "run r", width)]
        assert all(len(line) <= width for line in lines), lines
        text = " ".join(lines)
        for figure in ("round 3/3 sample", "r2 win vs prev 0.58", "vs base 0.60", "step 20/30"):
            assert figure in text, (width, figure, lines)
    assert ("round", "round 3/3: sampling") in state.log


async def test_watch_follows_a_rounds_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "rounds-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("rounds: {count: 3}\n")
    log = MetricsLog(run_dir / "metrics.jsonl")
    for event in rounds_events():
        log(event)
    log.close()
    app = DuetApp(watch=run_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        assert isinstance(screen, DashboardScreen)
        for _ in range(100):
            if screen.state.round is not None and screen.state.round.round == 3:
                break
            await pilot.pause(0.1)
        assert screen.state.round_results.keys() == {1, 2}
        assert screen.state.round_starts == {10, 20}
