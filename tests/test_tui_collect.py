"""The Collect screen (``duet collect``) driven by Textual's pilot on the built-in demo model: every key and
what it writes to the judgements file, the sides shuffled per pair and mapped back, resuming a file, errors
on screen, the "train on these" hand-over, key presses while answers generate, and snapshots at 80×24 and
120×40. Each launch loads the demo model (seconds), so one launch checks many keys."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from textual import events
from textual.widgets import Input, Static, TextArea

from app.api import Answers, Config, resolve_config
from tui.app import DuetApp
from tui.collect import ALL_JUDGED, CollectScreen, EditDialog, PromptDialog, generated_side, pane_text
from tui.dashboard import DashboardScreen

PROMPTS = [
    "What is two plus two?",
    "Name a colour.",
    "Say hello.",
    "Count to three.",
    "What is your favourite sport?",
    "Tell me about cats.",
    "Give me a word.",
    "How are you?",
    "What is the sky like?",
    "Name an animal.",
]


def collect_config(tmp_path: Path, *overrides: str) -> Config:
    # float32, exact: the snapshots then hold on a CPU without native bf16 too (auto would pick per machine)
    settings = ["sampling.max_new_tokens=24", "sampling.precision=float32", f"train.cache_dir={tmp_path / 'cache'}"]
    return resolve_config(None, [*settings, *overrides])


def collect_app(tmp_path: Path, *overrides: str, prompts: list[str] = PROMPTS) -> tuple[DuetApp, Path]:
    source, out = tmp_path / "prompts.txt", tmp_path / "col.jsonl"
    source.write_text("".join(p + "\n" for p in prompts))
    config = collect_config(tmp_path, *overrides)
    return DuetApp(config, collect=(config, str(source), str(out))), out


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def shown(screen: CollectScreen, part: str) -> str:
    """What the screen shows: ``left``, ``right``, ``prompt``, ``status`` or ``tally``."""
    widget_id = {"left": "left-text", "right": "right-text", "prompt": "prompt-text", "status": "collect-status"}
    return str(screen.query_one(f"#{widget_id.get(part, part)}", Static).content)


async def wait_for(pilot, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        await pilot.pause(0.02)


async def ready(pilot) -> Answers:
    """Wait until both answers of the current pair are generated and on screen; the pair."""
    screen = pilot.app.screen
    assert isinstance(screen, CollectScreen), type(screen)

    def on_screen() -> bool:
        answers = screen.session.current() if screen.session is not None else None
        return (
            answers is not None
            and answers.done
            and all(shown(screen, pane) == pane_text(answers, pane) for pane in ("left", "right"))
            and "ready" in shown(screen, "status")
        )

    await wait_for(pilot, on_screen)
    return screen.session.current()


def expected_line(answers: Answers, verdict: str, chosen: str | None = None, rejected: str | None = None) -> dict:
    """What a judgement's line must hold: the prompt, the verdict, the judge, the seeds, which side was left."""
    line = {
        "prompt": answers.prompt.text,
        "verdict": verdict,
        "judge": "human",
        "seeds": answers.seeds,
        "attempt": answers.attempt,
        "left": answers.left,
        "answers": None if verdict == "skip" else {"a": answers.texts[0], "b": answers.texts[1]},
    }
    if chosen is not None:
        line["chosen"], line["rejected"] = chosen, rejected
    return line


def as_expected(record: dict[str, Any]) -> dict:
    meta = record["duet"]
    line = {
        "prompt": record["prompt"][-1]["content"],
        "verdict": meta["verdict"],
        "judge": meta["judge"],
        "seeds": meta["seeds"],
        "attempt": meta["attempt"],
        "left": meta["left"],
        "answers": meta["answers"],
    }
    assert len(record["prompt"]) == 1 and record["prompt"][0]["role"] == "user"
    if "chosen" in record:
        line["chosen"], line["rejected"] = record["chosen"][0]["content"], record["rejected"][0]["content"]
    return line


def collecting_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "duet-collect" and t.is_alive()]


def spy_notifications(app: DuetApp) -> list[str]:
    notes: list[str] = []
    notify = app.notify

    def spy(message: str, **kwargs: Any) -> None:
        notes.append(message)
        notify(message, **kwargs)

    app.notify = spy  # type: ignore[method-assign]
    return notes


async def test_every_key_writes_what_the_screen_showed(tmp_path: Path, monkeypatch) -> None:
    import tui.session

    started: list[Config] = []  # "train on these" hands the run to the dashboard; the run itself is not the test
    monkeypatch.setattr(tui.session.TrainingSession, "run", lambda self, post: started.append(self.config))
    app, out = collect_app(tmp_path)
    notes = spy_notifications(app)
    expected: list[dict] = []
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        assert isinstance(screen, CollectScreen)
        lefts = set()

        # 1 and 2 (and ← →): the side shown, mapped through answers.left to the side generated
        for key, pane in (("1", "left"), ("2", "right"), ("left", "left"), ("right", "right")):
            answers = await ready(pilot)
            other = "right" if pane == "left" else "left"
            chosen, rejected = shown(screen, pane), shown(screen, other)
            lefts.add(answers.left)
            await pilot.press(key)
            line = as_expected(records(out)[-1])
            assert line["chosen"] == chosen and line["rejected"] == rejected, key
            assert line["verdict"] == generated_side(answers, pane)
            expected.append(expected_line(answers, line["verdict"], chosen, rejected))
        assert lefts == {"a", "b"}, "the sides are shuffled: both orders must have been seen"

        # t and x: no preference, both answers recorded
        for key, verdict in (("t", "tie"), ("x", "both_bad")):
            answers = await ready(pilot)
            await pilot.press(key)
            expected.append(expected_line(answers, verdict))

        # e edits the left answer, E the right: the edit is chosen over the other answer as generated
        for key, pane in (("e", "left"), ("E", "right")):
            answers = await ready(pilot)
            other = "right" if pane == "left" else "left"
            original, rejected = shown(screen, pane), shown(screen, other)
            await pilot.press(key)
            dialog = app.screen
            assert isinstance(dialog, EditDialog)
            area = dialog.query_one(TextArea)
            assert area.text == original
            area.move_cursor(area.document.end)
            await pilot.press("X", "Y", "Z")
            await (pilot.press("ctrl+s") if key == "e" else pilot.click("#save"))
            assert app.screen is screen
            line = as_expected(records(out)[-1])
            assert line["chosen"] == original + "XYZ" and line["rejected"] == rejected
            assert records(out)[-1]["duet"]["edited"] is True
            expected.append(expected_line(answers, generated_side(answers, pane), original + "XYZ", rejected))

        # r: new answers (the next attempt's seeds); nothing written
        before = await ready(pilot)
        lines = len(records(out))
        await pilot.press("r")
        after = await ready(pilot)
        assert after.prompt == before.prompt and after.attempt == before.attempt + 1
        assert after.seeds != before.seeds and len(records(out)) == lines

        # a verdict while the pair still generates is refused with a word (skip is not)
        with screen.session.sampler._lock:  # generation waits on this lock: the pair stays unfinished
            await pilot.press("r")
            await pilot.press("1")
            assert notes[-1] == "still generating" and len(records(out)) == lines
            assert "generating" in shown(screen, "status")
            skipped = screen.session.current()
            await pilot.press("s")
        assert as_expected(records(out)[-1]) == expected_line(skipped, "skip")

        # u: the last line leaves the file; its prompt is back
        text_before_undo = out.read_text()
        await pilot.press("u")
        assert out.read_text() == text_before_undo[: text_before_undo.rindex("\n", 0, -1) + 1]
        back = await ready(pilot)
        assert back.prompt == skipped.prompt and skipped.prompt.text in shown(screen, "prompt")

        # p: a typed prompt is judged next
        await pilot.press("p")
        assert isinstance(app.screen, PromptDialog)
        app.screen.query_one(Input).value = "A prompt of my own"
        await pilot.press("enter")
        answers = await ready(pilot)
        assert answers.prompt == back.prompt  # the current pair first
        chosen, rejected = shown(screen, "right"), shown(screen, "left")
        await pilot.press("2")
        expected.append(expected_line(answers, generated_side(answers, "right"), chosen, rejected))
        typed = await ready(pilot)
        assert typed.prompt.text == "A prompt of my own" and "A prompt of my own" in shown(screen, "prompt")

        assert [as_expected(r) for r in records(out)] == expected
        assert shown(screen, "tally").startswith("judged 7 · ties 1 · both bad 1 · skipped 0 · remaining 2")

        # T: a training run on the file, from the same model and adapter
        await pilot.press("T")
        assert isinstance(app.screen, DashboardScreen)
        await wait_for(pilot, lambda: started)
        assert started[0].data.train == str(out.resolve()) and started[0].model.path == screen.config.model.path
    assert not collecting_threads(), "quitting closes the session"


async def test_resume_latency_and_train_refused_without_preferences(tmp_path: Path) -> None:
    app, out = collect_app(tmp_path)
    notes = spy_notifications(app)
    latencies: list[float] = []
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        await ready(pilot)
        await pilot.press("T")
        assert app.screen is screen and "no preference" in notes[-1]

        # key presses while the answers generate: r starts a new pair each time, so generation never rests.
        # Timed from the key event as the terminal driver posts it to the end of its handler (which redraws
        # the panes): `pilot.press` also waits until the whole process idles, i.e. until generation ends.
        handled: list[float] = []
        regenerate = screen.action_regenerate

        def probe() -> None:
            regenerate()
            handled.append(time.perf_counter())

        screen.action_regenerate = probe
        busy = 0  # presses that landed while a pair was generating
        for _ in range(25):
            seen, pressed = len(handled), time.perf_counter()
            busy += not screen.session.current().done
            app.post_message(events.Key("r", "r"))
            while len(handled) == seen and time.perf_counter() - pressed < 5:
                await asyncio.sleep(0.002)
            assert len(handled) > seen, "a key press was never handled"
            latencies.append(handled[-1] - pressed)
            await asyncio.sleep(0.03)
        assert busy >= 20, f"generation must run while the keys are pressed: {busy} of 25 presses"

        await ready(pilot)
        await pilot.press("1")
        await ready(pilot)
        await pilot.press("x")
        await ready(pilot)
    median = statistics.median(latencies)
    print(f"collect key press: median {median * 1000:.1f} ms over {len(latencies)} presses while generating")
    assert median < 0.050, latencies
    assert [r["duet"]["verdict"] for r in records(out)][1] == "both_bad"

    # reopened on the same file: the third prompt, the earlier verdicts counted
    app, out = collect_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        answers = await ready(pilot)
        screen = app.screen
        assert answers.prompt.text == PROMPTS[2] and PROMPTS[2] in shown(screen, "prompt")
        assert shown(screen, "tally").startswith("judged 1 · ties 0 · both bad 1 · skipped 0 · remaining 8")

        # skipping the rest (s needs no answers): every prompt judged, said where the pair was
        notes = spy_notifications(app)
        await pilot.press(*["s"] * 8)
        assert shown(screen, "prompt") == ALL_JUDGED and shown(screen, "status") == ALL_JUDGED
        await pilot.press("1")
        assert "every prompt is judged" in notes[-1] and len(records(out)) == 10
        await pilot.press("u")
        assert (await ready(pilot)).prompt.text == PROMPTS[-1]


@pytest.mark.parametrize(
    ("prompts", "override", "message"),
    [
        (["# only a comment"], None, "no prompts in it"),
        (PROMPTS, "model.path=/no/such/model", "/no/such/model"),
    ],
    ids=["empty-prompts", "bad-model"],
)
async def test_errors_are_shown_on_screen(tmp_path: Path, prompts, override, message) -> None:
    app, _ = collect_app(tmp_path, *([override] if override else []), prompts=prompts)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await wait_for(pilot, lambda: screen.failure is not None)
        assert message in shown(screen, "prompt") and "q to quit" in shown(screen, "status")
        await pilot.press("q")
        assert app.return_code == 0  # q quit the app


SIZES = [(80, 24), (120, 40)]


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_collect_screen_snapshot(snap_compare, tmp_path: Path, size) -> None:
    # a prompt and answers long enough to wrap at 80 columns (the answers are seeded: the same every run)
    cook = "What should I cook tonight? I have rice, eggs, some spinach and half an onion, and I want it quick."
    app, _ = collect_app(tmp_path, "sampling.max_new_tokens=80", prompts=[cook, *PROMPTS[:2]])
    assert snap_compare(app, terminal_size=size, run_before=ready)
