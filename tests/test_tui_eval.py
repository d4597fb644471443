"""The Eval screen (``duet eval RUN --tui``) and the blind A/B (``duet eval RUN --blind``) driven by Textual's
pilot on a real demo run trained once for the module: the evaluation's progress and report, a re-run from the
answer cache, errors on screen, the blind verdicts mapped back to tuned and base and counted by the next
evaluation, and snapshots at 80×24 and 120×40."""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from textual.widgets import Markdown, Static

from app.api import Answers, Info, Progress, evaluate, resolve_config, run
from tui.app import DuetApp
from tui.blind import BlindScreen, blind_tally
from tui.collect import KeyLegend, generated_side, pane_text
from tui.eval_view import EvalEvent, EvalScreen

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "models" / "demo" / "unseen_prompts.txt"
RULE = REPO / "models" / "demo" / "concise.py"
# the demo's rule judge on six held-out prompts, one short answer each: seconds, not minutes
EVAL_SETTINGS = [
    "judge.kind=rule",
    "evaluation.max_prompts=6",
    "evaluation.samples=1",
    "evaluation.kl_samples=1",
    "sampling.max_new_tokens=24",
    # float32, exact: the snapshots then hold on a CPU without native bf16 too (auto would pick per machine)
    "sampling.precision=float32",
]
OVERRIDES = [f"judge.rule={RULE}", *EVAL_SETTINGS]
SIZES = [(80, 24), (120, 40)]
IDS = ["80x24", "120x40"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The demo trained for 30 steps (a constant, higher learning rate: its answers already differ from the
    base model's on the held-out prompts, so the blind verdicts have something to tell apart)."""
    root = tmp_path_factory.mktemp("eval-demo")
    config = resolve_config(
        None,
        [
            f"train.output_dir={root / 'runs'}",
            "train.run_name=demo",
            f"train.cache_dir={root / 'cache'}",
            "train.max_steps=30",
            "train.save_every=30",
            "train.lr=3e-3",
            "train.warmup_ratio=0",
            "train.schedule=constant",
        ],
    )
    return Path(run(config, console=Console(file=io.StringIO(), width=120)).run_dir)


def fresh_run(demo_run: Path, folder: Path) -> Path:
    """A copy of the trained run without what the screens write into it (its report, its blind verdicts)."""
    copy = folder / "demo"
    shutil.copytree(demo_run, copy, ignore=shutil.ignore_patterns("eval", "blind-ab.jsonl", "*.lock"))
    return copy


async def wait_for(pilot, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        await pilot.pause(0.02)


def text_of(widget: Static) -> str:
    return str(widget.content)


def legend_text(screen) -> str:
    return "\n".join(line.plain for legend in screen.query(KeyLegend) for line in legend.lines(80))


def screen_text(screen, notes: list[str] = ()) -> str:
    """Every word the screen shows: its texts, its panes' titles, its key legend and the notifications."""
    parts = [text_of(w) for w in screen.query(Static)]
    for widget in screen.query("*"):
        parts += [str(widget.border_title or ""), str(widget.border_subtitle or "")]
    return "\n".join([*parts, legend_text(screen), *notes])


def spy_notifications(app: DuetApp) -> list[str]:
    notes: list[str] = []
    notify = app.notify

    def spy(message: str, **kwargs: Any) -> None:
        notes.append(message)
        notify(message, **kwargs)

    app.notify = spy  # type: ignore[method-assign]
    return notes


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def evaluated(pilot) -> None:
    """Wait until the evaluation is done (or failed) and its report is laid out."""
    screen = pilot.app.screen
    assert isinstance(screen, EvalScreen), type(screen)
    await wait_for(pilot, lambda: not screen.running and (screen.report is not None or screen.failure is not None))
    if screen.report is not None:
        await wait_for(pilot, lambda: screen.laid_out is screen.report and bool(screen.query("MarkdownTable")))
        log = screen.query_one("#eval-log")
        await wait_for(pilot, lambda: log.scroll_y == log.max_scroll_y)
    await pilot.pause(0.2)


async def ready(pilot) -> Answers:
    """Wait until the current pair is generated and both answers are on screen; the pair."""
    screen = pilot.app.screen
    assert isinstance(screen, BlindScreen), type(screen)

    def on_screen() -> bool:
        answers = screen.session.current() if screen.session is not None else None
        return (
            answers is not None
            and answers.done
            and all(text_of(screen.query_one(f"#{p}-text", Static)) == pane_text(answers, p) for p in ("left", "right"))
            and "ready" in text_of(screen.query_one("#collect-status", Static))
        )

    await wait_for(pilot, on_screen)
    return screen.session.current()


# -- the Eval screen ----------------------------------------------------------------------------------------


async def test_eval_screen_progress_report_rerun_and_blind(demo_run: Path, tmp_path: Path, monkeypatch) -> None:
    import core.progress

    monkeypatch.setattr(core.progress, "EVERY_SECONDS", 0.0)  # every batch of answers reports its progress
    run_dir = fresh_run(demo_run, tmp_path)
    overrides = [*OVERRIDES, f"train.cache_dir={tmp_path / 'cache'}"]  # its own cache: every answer generated
    app = DuetApp(evaluate=(str(run_dir), overrides, str(PROMPTS), False))
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        assert isinstance(screen, EvalScreen)
        lines: list[str] = []  # every progress line the screen showed
        show = screen._progress
        monkeypatch.setattr(screen, "_progress", lambda text: (lines.append(text.plain), show(text))[1])

        await evaluated(pilot)
        assert screen.failure is None, screen.failure
        assert any(line.startswith("base answers") and "6/6 prompts" in line for line in lines), lines
        assert any(line.startswith("evaluating ·") for line in lines), lines
        assert (run_dir / "eval" / "eval.md").is_file() and (run_dir / "eval" / "eval.json").is_file()
        markdown = screen.query_one("#report", Markdown)
        assert "Judge win rate, tuned over base" in markdown.source
        cells = [text_of(cell) for cell in screen.query("MarkdownTable").first().query(Static)]
        assert "Judge win rate, tuned over base (ties half)" in cells
        rate = screen.report["judge"]["rate"]
        assert f"{rate:.2f} [" in cells[cells.index("Judge win rate, tuned over base (ties half)") + 2]
        progress = text_of(screen.query_one("#eval-progress", Static))
        assert progress.startswith("done: the report is written to") and str(run_dir / "eval") in progress
        assert "evaluating demo on 6 prompts" in screen.logged and "from the cache" not in screen.logged

        # r: evaluated again; the answers come from the cache
        first = screen.result
        await pilot.press("r")
        await evaluated(pilot)
        assert screen.runs == 2 and screen.result is not first and screen.failure is None
        assert "base answers: 6 prompts' answers from the cache" in screen.logged
        assert "tuned answers: 6 prompts' answers from the cache" in screen.logged

        # a progress event mid-phase: label, count, ETA
        screen.post_message(
            EvalEvent(
                Progress(phase="evaluate", label="tuned answers", done=3, total=6, unit="prompts", elapsed=4, eta=4)
            )
        )
        await pilot.pause()
        assert re.fullmatch(r"tuned answers  ━{8}─{8}  3/6 prompts · 0:04 elapsed · ETA 0:04", lines[-1]), lines[-1]

        # b: the blind A/B over the report; leaving it says the tally on the Eval screen
        await pilot.press("b")
        blind = app.screen
        assert isinstance(blind, BlindScreen)
        await ready(pilot)
        await pilot.press("q")
        assert app.screen is screen
        assert "blind A/B of demo: tuned preferred 0, base 0, ties 0" in screen.logged
        await pilot.press("q")
    assert app.return_code == 0


async def test_an_earlier_report_shows_at_once_and_leaving_stops_a_run(
    demo_run: Path, tmp_path: Path, monkeypatch
) -> None:
    import tui.eval_view

    run_dir = fresh_run(demo_run, tmp_path)
    written = evaluate(run_dir, overrides=OVERRIDES, prompts=str(PROMPTS)).report
    app = DuetApp(evaluate=(str(run_dir), OVERRIDES, str(PROMPTS), False))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await evaluated(pilot)
        assert screen.runs == 0 and screen.report == written, "nothing evaluated: the report on disk is shown"
        assert text_of(screen.query_one("#eval-progress", Static)).endswith("r evaluates again")
        await pilot.press("q")
    assert app.return_code == 0

    # a checkpoint of the run: RUN/eval holds the final adapter's report, not its own, so it is evaluated;
    # an evaluation that never ends stands in for a long one, to leave while it runs
    calls: list[str] = []

    def endless(source, *, emit, **kwargs):
        calls.append(str(source))
        try:
            while True:
                emit(Info(message="still generating"))
                time.sleep(0.02)
        finally:
            calls.append("stopped")

    monkeypatch.setattr(tui.eval_view, "evaluate", endless)
    checkpoint = next((run_dir / "checkpoints").glob("step-*"))
    app = DuetApp(evaluate=(str(checkpoint), OVERRIDES, str(PROMPTS), False))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await wait_for(pilot, lambda: "still generating" in screen.logged)
        assert calls == [str(checkpoint)] and screen.report is None
        await pilot.press("r")
        assert calls == [str(checkpoint)], "r waits for the running evaluation"
        await pilot.press("q")  # leaving mid-run asks first
        assert app.screen is not screen
        await pilot.press("y")
        await wait_for(pilot, lambda: "stopped" in calls, timeout=5)  # the evaluation stops at its next event
    assert app.return_code == 0


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda tmp: tmp.mkdir(exist_ok=True) or tmp, "not a run folder"),
        (lambda tmp: tmp / "no-such-run", "not a run folder"),
    ],
    ids=["empty-folder", "missing"],
)
async def test_eval_errors_are_shown_on_screen(tmp_path: Path, make_source, message) -> None:
    source = make_source(tmp_path / "not-a-run")
    app = DuetApp(evaluate=(str(source), OVERRIDES, str(PROMPTS), False))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await evaluated(pilot)
        progress = text_of(screen.query_one("#eval-progress", Static))
        assert message in progress and progress.endswith("r tries again, q quits")
        assert "Traceback" not in screen_text(screen) and "Traceback" not in screen.logged
        await pilot.press("q")
    assert app.return_code == 1  # the CLI's exit status: no report


# -- the blind A/B ------------------------------------------------------------------------------------------


async def test_blind_ab_records_verdicts_without_saying_which_is_which(demo_run: Path, tmp_path: Path) -> None:
    run_dir = fresh_run(demo_run, tmp_path)
    out = run_dir / "blind-ab.jsonl"
    app = DuetApp(blind=(str(run_dir), OVERRIDES, str(PROMPTS)))
    judged: list[tuple[Answers, str]] = []
    notes = spy_notifications(app)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        assert isinstance(screen, BlindScreen)
        lefts = set()
        for key, pane in (("1", "left"), ("2", "right"), ("left", "left"), ("t", None)):
            answers = await ready(pilot)
            assert answers.texts[0] != answers.texts[1], "the demo run's answers differ from the base model's"
            words = screen_text(screen, notes)
            assert not re.search(r"\b(tuned|base)\b", words, re.IGNORECASE), words
            shown = {p: text_of(screen.query_one(f"#{p}-text", Static)) for p in ("left", "right")}
            lefts.add(answers.left)
            await pilot.press(key)
            record = records(out)[-1]
            meta = record["duet"]
            assert meta["sides"] == {"a": "tuned", "b": "base"} and meta["left"] == answers.left
            if pane is None:
                assert meta["verdict"] == "tie"
            else:
                # 1 with the tuned answer on the left: "a"; with the base one there: "b"
                assert (
                    meta["verdict"]
                    == generated_side(answers, pane)
                    == (answers.left if pane == "left" else {"a": "b", "b": "a"}[answers.left])
                )
                assert record["chosen"][0]["content"] == shown[pane]
            assert meta["answers"] == {"a": answers.texts[0], "b": answers.texts[1]}
            judged.append((answers, meta["verdict"]))
        assert lefts == {"a", "b"}, "the sides are shuffled: both orders must have been seen"

        # the Collect screen's edit, regenerate, new prompt and train keys do nothing here
        answers = await ready(pilot)
        before = out.read_text()
        await pilot.press("e", "E", "r", "p", "T")
        assert app.screen is screen and out.read_text() == before
        assert screen.session.current().attempt == answers.attempt
        legend = legend_text(screen)
        assert "1/← left better" in legend and "u undo" in legend
        assert not any(word in legend for word in ("edit", "regenerate", "new prompt", "train"))

        # x then u: the verdict is taken back; s skips
        await pilot.press("x")
        assert records(out)[-1]["duet"]["verdict"] == "both_bad"
        await pilot.press("u")
        assert len(records(out)) == len(judged)
        await pilot.press("s")
        assert records(out)[-1]["duet"]["verdict"] == "skip"
        await ready(pilot)
        assert not re.search(r"\b(tuned|base)\b", screen_text(screen, notes), re.IGNORECASE)
        await pilot.press("q")
    assert app.return_code == 0
    tuned = sum(1 for answers, verdict in judged if verdict == "a")
    base = sum(1 for answers, verdict in judged if verdict == "b")
    assert screen.tally_line == f"blind A/B of demo: tuned preferred {tuned}, base {base}, ties 1, skipped 1"
    assert blind_tally(records(out)) == screen.tally_line.split(": ", 1)[1]

    # the next evaluation counts the person's verdicts, and its answers are the ones judged blind
    result = evaluate(run_dir, overrides=OVERRIDES, prompts=str(PROMPTS))
    human = result.report["human"]
    assert human["n"] == len(judged) and human["wins"] == tuned and human["losses"] == base
    rows = {row["prompt"]: row for row in result.answers}
    for answers, _ in judged:
        row = rows[answers.prompt.text]
        assert (answers.texts[0], answers.texts[1]) == (row["tuned"], row["base"])


# -- snapshots ----------------------------------------------------------------------------------------------


def snapshot_folder(demo_run: Path, tmp_path: Path, monkeypatch) -> list[str]:
    """The run, prompts and rule under the working folder, named relatively, a cache of their own: the
    picture holds no machine-specific path, and every answer is generated (no "from the cache")."""
    fresh_run(demo_run, tmp_path)
    shutil.copy(PROMPTS, tmp_path / "prompts.txt")
    shutil.copy(RULE, tmp_path / "concise.py")
    monkeypatch.chdir(tmp_path)
    return ["judge.rule=concise.py", *EVAL_SETTINGS, "train.cache_dir=cache"]


@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_eval_screen_snapshot(snap_compare, demo_run: Path, tmp_path: Path, monkeypatch, size) -> None:
    import tui.eval_view

    overrides = snapshot_folder(demo_run, tmp_path, monkeypatch)
    render = tui.eval_view.render_markdown
    root = str(tmp_path.resolve()) + "/"

    def steady(report: dict[str, Any]) -> str:  # the report's own paths and time: the same in every picture
        return re.sub(r"`\d{4}-\d\d-\d\dT[\d:]+Z`", "`2025-01-01T00:00:00Z`", render(report).replace(root, ""))

    monkeypatch.setattr(tui.eval_view, "render_markdown", steady)

    async def done(pilot) -> None:
        await evaluated(pilot)
        pilot.app.clear_notifications()
        await pilot.pause(0.3)

    app = DuetApp(evaluate=("demo", overrides, "prompts.txt", False))
    assert snap_compare(app, terminal_size=size, run_before=done)


@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_blind_screen_snapshot(snap_compare, demo_run: Path, tmp_path: Path, monkeypatch, size) -> None:
    overrides = snapshot_folder(demo_run, tmp_path, monkeypatch)
    app = DuetApp(blind=("demo", overrides, "prompts.txt"))
    assert snap_compare(app, terminal_size=size, run_before=ready)
