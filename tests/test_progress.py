"""Long phases report progress: throttled events with a count and an ETA, on the console and in metrics.jsonl."""

from __future__ import annotations

import io

from rich.console import Console

from core.events import event_from_json
from core.metrics import ConsoleReporter, read_metrics
from core.progress import PhaseProgress
from core.run import run
from tests.helpers import quick_config


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_events_are_throttled_and_carry_an_eta() -> None:
    events, clock = [], Clock()
    progress = PhaseProgress(events.append, "reference", "reference log-probs (train)", 100, clock=clock)
    for done in range(0, 101, 10):
        clock.now = done * 0.25  # 10 pairs every 2.5 s: one event a batch after the first second
        progress(done, 100)
    assert [e["done"] for e in events] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert events[0].to_json() == {
        "type": "progress",
        "phase": "reference",
        "label": "reference log-probs (train)",
        "done": 10,
        "total": 100,
        "unit": "pairs",
        "elapsed": 2.5,
        "eta": 22.5,
        "message": "reference log-probs (train): 10/100 pairs, 0:02 elapsed, ETA 0:22",
    }
    assert events[-1]["eta"] == 0.0 and "ETA" not in events[-1]["message"]


def test_a_quick_phase_says_nothing() -> None:
    events, clock = [], Clock()
    progress = PhaseProgress(events.append, "eval", "evaluation", 8, clock=clock)
    for done in (0, 4, 8):
        clock.now = done * 0.01
        progress(done, 8)
    assert events == []


def test_the_console_shows_a_bar_in_a_terminal_and_lines_in_a_log() -> None:
    log = io.StringIO()
    reporter = ConsoleReporter(Console(file=log, force_terminal=False, width=120), every_seconds=0.0)
    event = {"type": "progress", "phase": "reference", "label": "ref", "done": 3, "total": 9, "unit": "pairs"}
    reporter(event_from_json({**event, "message": "ref: 3/9 pairs, 0:01 elapsed, ETA 0:02"}))
    reporter(
        event_from_json({**event, "done": 9, "message": "ref: 9/9 pairs, 0:03 elapsed"})
    )  # the phase's own message follows
    assert log.getvalue() == "ref: 3/9 pairs, 0:01 elapsed, ETA 0:02\n"
    screen = io.StringIO()
    reporter = ConsoleReporter(Console(file=screen, force_terminal=True, width=120))
    reporter(event_from_json({**event, "message": "ref: 3/9 pairs"}))
    reporter(event_from_json({"type": "info", "message": "next"}))  # a transient bar is gone before the next line
    reporter.close()
    assert "next" in screen.getvalue() and "3/9 pairs" in screen.getvalue()


def test_a_slow_reference_pass_is_followed_in_metrics_jsonl(tmp_path, monkeypatch) -> None:
    import core.progress

    monkeypatch.setattr(core.progress, "EVERY_SECONDS", 0.0)  # the demo's phases are quick: report them anyway
    result = run(quick_config(tmp_path), handle_signals=False)
    events = read_metrics(result.run_dir / "metrics.jsonl")
    phases = [(e["label"], e["done"], e["total"]) for e in events if e["type"] == "progress"]
    train = [p for p in phases if p[0] == "reference log-probs (train)"]
    assert train[-1][1:] == (56, 56) and len(train) > 2  # 64 pairs, 8 held out; one event a batch of 8
    assert ("evaluation at step 6", 8, 8) in phases
    kinds = [e["type"] for e in events]
    assert kinds.index("progress") < kinds.index("reference")  # the bar, then the phase's closing message


def test_tokenizing_shows_progress_to_the_caller_before_the_run_directory_exists(tmp_path, monkeypatch) -> None:
    import core.progress

    monkeypatch.setattr(core.progress, "EVERY_SECONDS", 0.0)
    seen = []
    result = run(quick_config(tmp_path), handle_signals=False, callback=seen.append)
    tokenizing = [e for e in seen if e["type"] == "progress" and e["phase"] == "tokenize"]
    assert tokenizing and tokenizing[-1]["done"] == tokenizing[-1]["total"] == 64
    assert tokenizing[-1]["label"] == "tokenizing prefs.jsonl"
    written = read_metrics(result.run_dir / "metrics.jsonl")  # the file did not exist yet: not in it
    assert not [e for e in written if e.get("phase") == "tokenize"]
    again = []
    run(quick_config(tmp_path), handle_signals=False, callback=again.append)  # the token cache: nothing to follow
    assert not [e for e in again if e["type"] == "progress" and e["phase"] == "tokenize"]
