"""The Collect screen's thumbs mode (``duet collect PROMPTS --out FILE --thumbs``) driven by Textual's pilot on
the built-in demo model: one answer at a time, each key and the unpaired row it writes (TRL's prompt /
completion / label), skip and undo, resuming a file, a file of the other kind refused on screen and on the
command line, and snapshots at 80×24 and 120×40."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, TextArea

from app.api import Answers
from app.cli import _collect_main
from core.collect import JudgementsFile, judgement_record, thumbs_record, user_prompt
from core.errors import DataError
from tests.test_tui_collect import PROMPTS, collect_config, records, shown, spy_notifications, wait_for
from tui.app import DuetApp
from tui.collect import THUMBS_ALL_RATED, CollectScreen, EditDialog, PromptDialog, ThumbsScreen
from tui.dashboard import DashboardScreen

META = {"mode", "verdict", "judge", "prompt_key", "source", "answer", "edited", "time", "seeds", "temperatures"}


def thumbs_app(
    tmp_path: Path, *overrides: str, prompts: list[str] = PROMPTS, out: str | Path | None = None, thumbs: bool = True
) -> tuple[DuetApp, Path]:
    source = tmp_path / "prompts.txt"
    source.write_text("".join(p + "\n" for p in prompts))
    out = Path(out) if out is not None else tmp_path / "thumbs.jsonl"
    config = collect_config(tmp_path, *overrides)
    return DuetApp(config, collect=(config, str(source), str(out)), thumbs=thumbs), out


async def ready(pilot) -> Answers:
    """Wait until the current answer is generated and on screen; the answer."""
    screen = pilot.app.screen
    assert isinstance(screen, ThumbsScreen), type(screen)

    def on_screen() -> bool:
        answers = screen.session.current() if screen.session is not None else None
        return (
            answers is not None
            and answers.done
            and shown(screen, "answer-text") == answers.texts[0]
            and "ready" in shown(screen, "status")
        )

    await wait_for(pilot, on_screen)
    return screen.session.current()


def check_row(record: dict[str, Any], answers: Answers, verdict: str, completion: str | None = None) -> None:
    """The row is TRL's unpaired format (conversational) plus Duet's provenance: exactly these keys."""
    assert record["prompt"] == [{"role": "user", "content": answers.prompt.text}]
    meta = record["duet"]
    assert set(meta) >= META and "left" not in meta and "answers" not in meta
    assert (meta["mode"], meta["verdict"], meta["judge"]) == ("thumbs", verdict, "human")
    assert (meta["prompt_key"], meta["seeds"], meta["attempt"]) == (answers.prompt.key, answers.seeds, answers.attempt)
    assert len(meta["seeds"]) == 1 and len(meta["temperatures"]) == 1  # one answer, one seed
    if verdict == "skip":
        assert set(record) == {"prompt", "duet"} and meta["answer"] is None
        return
    assert set(record) == {"prompt", "completion", "label", "duet"}
    assert record["label"] is (verdict == "up")
    text = answers.texts[0] if completion is None else completion
    assert record["completion"] == [{"role": "assistant", "content": text}]
    assert meta["answer"] == answers.texts[0] and meta["edited"] is (completion is not None)


async def test_every_thumbs_key_writes_an_unpaired_row(tmp_path: Path, monkeypatch) -> None:
    import tui.session

    started: list = []  # "train" hands the run to the dashboard; the run itself is not the test
    monkeypatch.setattr(tui.session.TrainingSession, "run", lambda self, post: started.append(self.config))
    app, out = thumbs_app(tmp_path)
    notes = spy_notifications(app)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        assert isinstance(screen, ThumbsScreen)
        assert len(screen.query(".answer")) == 1, "one answer at a time"

        # + 1 ↑ thumbs up, - 2 ↓ thumbs down: each one line, the answer shown as its completion
        for key, verdict in (("plus", "up"), ("1", "up"), ("up", "up"), ("minus", "down"), ("2", "down")):
            answers = await ready(pilot)
            await pilot.press(key)
            check_row(records(out)[-1], answers, verdict)
        answers = await ready(pilot)
        await pilot.press("down")
        check_row(records(out)[-1], answers, "down")
        assert shown(screen, "tally") == f"up 3 · down 3 · skipped 0 · remaining 4  → {out}"

        # e: the edit is the completion, a thumbs up; the answer as generated stays in duet.answer
        answers = await ready(pilot)
        await pilot.press("e")
        dialog = app.screen
        assert isinstance(dialog, EditDialog) and dialog.query_one(TextArea).text == answers.texts[0]
        await pilot.press("X", "Y", "ctrl+s")
        assert app.screen is screen
        check_row(records(out)[-1], answers, "up", completion=answers.texts[0] + "XY")

        # r: a new answer (the next attempt's seed); nothing written
        before = await ready(pilot)
        await pilot.press("r")
        after = await ready(pilot)
        assert after.prompt == before.prompt and after.attempt == before.attempt + 1 and after.seeds != before.seeds
        assert len(records(out)) == 7

        # a rating while the answer still generates is refused with a word; s needs no answer
        with screen.session.sampler._lock:  # generation waits on this lock: the answer stays unfinished
            await pilot.press("r")
            await pilot.press("plus")
            assert notes[-1] == "still generating" and len(records(out)) == 7
            skipped = screen.session.current()
            await pilot.press("s")
        check_row(records(out)[-1], skipped, "skip")
        assert shown(screen, "tally").startswith("up 4 · down 3 · skipped 1 · remaining 2")

        # u: the last line leaves the file (truncated away), its prompt is back
        text = out.read_text()
        await pilot.press("u")
        assert out.read_text() == text[: text.rindex("\n", 0, -1) + 1] and notes[-1].startswith("undone: skip")
        back = await ready(pilot)
        assert back.prompt == skipped.prompt
        await pilot.press("u")
        assert notes[-1].startswith("undone: thumbs up") and len(records(out)) == 6

        # p: a typed prompt is rated after the current one
        current = await ready(pilot)
        await pilot.press("p")
        assert isinstance(app.screen, PromptDialog)
        app.screen.query_one(Input).value = "A prompt of my own"
        await pilot.press("enter")
        assert (await ready(pilot)).prompt == current.prompt
        await pilot.press("minus")
        check_row(records(out)[-1], current, "down")
        assert (await ready(pilot)).prompt.text == "A prompt of my own"

        # T: KTO on the ratings, from the same model
        await pilot.press("T")
        assert isinstance(app.screen, DashboardScreen)
        await wait_for(pilot, lambda: started)
        assert started[0].data.train == str(out.resolve()) and started[0].objective.name == "kto"
        assert started[0].objective.nll_weight == 0.0
    assert [r["duet"]["verdict"] for r in records(out)] == ["up", "up", "up", "down", "down", "down", "down"]


async def test_reopening_a_thumbs_file_resumes_at_the_next_unrated_prompt(tmp_path: Path) -> None:
    prompts = PROMPTS[:4]
    app, out = thumbs_app(tmp_path, prompts=prompts)
    async with app.run_test(size=(100, 30)) as pilot:
        for key in ("plus", "minus"):
            await ready(pilot)
            await pilot.press(key)
        await pilot.press("s")  # s needs no answer

    app, out = thumbs_app(tmp_path, prompts=prompts)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        answers = await ready(pilot)
        assert answers.prompt.text == prompts[3], "the rated and the skipped prompts are not asked again"
        assert shown(screen, "tally").startswith("up 1 · down 1 · skipped 1 · remaining 1")
        await pilot.press("2")
        assert shown(screen, "prompt") == THUMBS_ALL_RATED and shown(screen, "status") == THUMBS_ALL_RATED
        await pilot.press("u")  # the last rating back, even across sessions
        assert (await ready(pilot)).prompt.text == prompts[3]
    assert [r["duet"]["verdict"] for r in records(out)] == ["up", "down", "skip"]


def write_pairs_file(path: Path) -> None:
    with JudgementsFile(path) as file:
        file.append(judgement_record(user_prompt("Q", "q:1"), ("A", "B"), "a", judge="human", provenance={}))


def write_thumbs_file(path: Path) -> None:
    with JudgementsFile(path, mode="thumbs") as file:
        file.append(thumbs_record(user_prompt("Q", "q:1"), "A", "up", judge="human", provenance={}))


@pytest.mark.parametrize(
    ("write", "thumbs", "message"),
    [
        (write_pairs_file, True, "holds pair judgements"),
        (write_thumbs_file, False, "holds thumbs-up/down ratings"),
    ],
    ids=["pairs-file-with-thumbs", "thumbs-file-without"],
)
async def test_a_file_of_the_other_kind_is_refused_on_screen(tmp_path: Path, write, thumbs, message) -> None:
    out = tmp_path / "mixed.jsonl"
    write(out)
    before = out.read_bytes()
    app, _ = thumbs_app(tmp_path, out=out, thumbs=thumbs)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert isinstance(screen, CollectScreen) and isinstance(screen, ThumbsScreen) is thumbs
        await wait_for(pilot, lambda: screen.failure is not None)
        assert f"{out}:1" in screen.failure and message in screen.failure and "--out" in screen.failure
        assert "q to quit" in shown(screen, "status")
        await pilot.press("q")
    assert out.read_bytes() == before, "the file is left as it was"


def test_the_command_line_refuses_a_file_of_the_other_kind_before_the_screen(tmp_path: Path, capsys) -> None:
    pairs, ratings = tmp_path / "pairs.jsonl", tmp_path / "ratings.jsonl"
    write_pairs_file(pairs)
    write_thumbs_file(ratings)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Q\n")
    assert _collect_main([str(prompts), "--out", str(pairs), "--thumbs"]) == 2
    error = capsys.readouterr().err
    assert str(pairs) in error and "holds pair judgements" in error and "drop --thumbs" in error
    assert _collect_main([str(prompts), "--out", str(ratings)]) == 2
    error = capsys.readouterr().err
    assert str(ratings) in error and "Add --thumbs" in error
    assert _collect_main([str(prompts), "--out", str(ratings), "--thumbs", "--judge", "rule:x.py"]) == 2
    assert "--thumbs is a person rating" in capsys.readouterr().err


def test_thumbs_records_and_files_are_checked(tmp_path: Path) -> None:
    prompt = user_prompt("Q", "q:1")
    with pytest.raises(ValueError, match="unknown thumbs verdict"):
        thumbs_record(prompt, "A", "a", judge="human", provenance={})
    with pytest.raises(ValueError, match="thumbs up"):
        thumbs_record(prompt, "A", "down", judge="human", provenance={}, edited="B")
    # a thumbs file whose skips come first is still a thumbs file: every line says its kind (duet.mode)
    path = tmp_path / "skips.jsonl"
    with JudgementsFile(path, mode="thumbs") as file:
        file.append(thumbs_record(prompt, "", "skip", judge="human", provenance={}))
    with pytest.raises(DataError, match=r"skips.jsonl:1: this file holds thumbs-up/down ratings"):
        JudgementsFile(path)
    with JudgementsFile(path, mode="thumbs") as file:
        assert file.counts() == {"skip": 1}


SIZES = [(80, 24), (120, 40)]


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_thumbs_screen_snapshot(snap_compare, tmp_path: Path, monkeypatch, size) -> None:
    # a prompt and an answer long enough to wrap at 80 columns (the answer is seeded: the same every run; seed 3
    # gives the demo model's long answer); the file path shown is the one given, relative here so that the
    # snapshot does not hold the temporary folder
    monkeypatch.chdir(tmp_path)
    cook = "What should I cook tonight? I have rice, eggs, some spinach and half an onion, and I want it quick."
    settings = ("sampling.max_new_tokens=80", "sampling.seed=3")
    app, _ = thumbs_app(tmp_path, *settings, prompts=[cook, *PROMPTS[:2]], out="thumbs.jsonl")
    assert snap_compare(app, terminal_size=size, run_before=ready)
