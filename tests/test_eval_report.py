"""The evaluation report: its Markdown reads right whatever the answers hold, its charts are small valid PNGs
that come out the same twice, and its folder is replaced as a whole: a failure or a SIGKILL at any moment
leaves the previous complete report or the new one."""

from __future__ import annotations

import copy
import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from core import faults
from core.evaluation import report as evaluation
from core.evaluation.report import (
    HOW_TO_READ,
    compare_rows,
    read_report,
    recover_report,
    render_charts,
    render_compare,
    render_markdown,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZES = {
    "lengths.png": (640, 360),
    "win_rates.png": (640, 360),
    "margins.png": (640, 360),
    "checkpoints.png": (960, 320),
}
ALL_CHARTS = set(SIZES)
HEADINGS = {"## Summary", "## Settings", "## Checkpoints", "## Charts", "## Examples", "## How to read this"}
TRICKY_PROMPT = "# Not a heading | nor a cell\n1. not a list\n> not a quote"


def judge_stats(wins: int, ties: int, losses: int, name: str = "rule:concise.py", kind: str = "rule") -> dict[str, Any]:
    n = wins + ties + losses
    rate = (wins + ties / 2) / n
    return {
        "name": name,
        "kind": kind,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "n": n,
        "rate": rate,
        "low": rate - 0.1,
        "high": rate + 0.1,
        "both_orders": True,
        "consistency": 0.9,
    }


def degeneration(mean: float) -> dict[str, Any]:
    return {
        "answers": 96,
        "finished": 0.98,
        "empty": 0.0,
        "distinct_1": 0.3,
        "distinct_2": 0.6,
        "repeated_4gram": 0.01,
        "mean_tokens": mean,
        "median_tokens": mean - 2,
    }


def full_report(seed: int = 0, size: int = 48) -> dict[str, Any]:
    """Every part measured, with a prompt and names that Markdown would mangle if they were not escaped."""
    rng = random.Random(seed)
    return {
        "version": 1,
        "created": "2025-01-01T00:00:00+00:00",
        "run": "runs/sweep|beta=0.1",
        "adapter": "runs/sweep|beta=0.1/adapter",
        "base": "tiny-chat",
        "training": {"objective": "dpo", "beta": 0.1, "steps": 120, "lr": 5e-5},
        "settings": {
            "prompts": "held-out split",
            "num_prompts": size,
            "samples": 2,
            "greedy": False,
            "sampling": {"temperature": 0.8, "top_p": 1.0, "top_k": 0, "max_new_tokens": 128, "seed": 0},
            "kl_samples": 1,
            "judge": "rule:concise|short.py",
        },
        "judge": {**judge_stats(30, 5, 13), "name": "rule:concise|short.py"},
        "length_controlled": {"rate": 0.6, "low": 0.5, "high": 0.7, "slope": -1.2, "unit": "tokens"},
        "human": judge_stats(10, 2, 8, name="human", kind="human"),
        "lengths": {
            "base": [rng.randint(10, 120) for _ in range(size * 2)],
            "tuned": [rng.randint(5, 90) for _ in range(size * 2)],
        },
        "degeneration": {"base": degeneration(40.2), "tuned": degeneration(30.1)},
        "kl": {
            "per_answer": 3.2,
            "low": 2.8,
            "high": 3.6,
            "per_token": 0.08,
            "entropy_per_token": 1.1,
            "answers": size,
            "tokens": 1900,
        },
        "pairs": {
            "step": 120,
            "reward_accuracy": 0.9,
            "margin": 1.3,
            "loss": 0.4,
            "margins": [rng.gauss(1.3, 1.0) for _ in range(64)],
        },
        "examples": [
            {"prompt": TRICKY_PROMPT, "base": "A | B\n## also not a heading", "tuned": "", "verdict": "tuned"},
            {"prompt": "Name a tree.", "base": "Oak, *probably*.", "tuned": "Oak.", "verdict": "tie"},
            {"prompt": "Name a river.", "base": "The Nile.", "tuned": "Nile", "verdict": "base"},
        ],
        "checkpoints": [
            {
                "step": step,
                "judge": judge_stats(20 + step // 10, 5, 23 - step // 10),
                "kl": {"per_answer": step / 40, "low": step / 50, "high": step / 30},
                "mean_tokens": 40 - step / 10,
            }
            for step in (20, 40, 80, 120)
        ],
    }


def partial_report() -> dict[str, Any]:
    report = full_report()
    report.update(pairs=None, human=None, checkpoints=None)
    return report


def small_report(run: str) -> dict[str, Any]:
    """A quick one to write (two charts), told apart by its run."""
    return {**partial_report(), "run": run}


def answers(count: int = 3) -> list[dict[str, Any]]:
    return [{"prompt": f"p{i}", "base": "b", "tuned": "t", "verdict": "tie"} for i in range(count)]


def cells(row: str) -> int:
    """How many cells GFM sees in a table row: it splits on every pipe no backslash escapes."""
    return sum(token == "|" for token in re.findall(r"\\.|\||[^\\|]+", row)) - 1


def tables(markdown: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    previous = ""
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                blocks.append([])
            blocks[-1].append(line)
        previous = line
    return blocks


def assert_valid_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path.name
    assert len(data) < 200_000, (path.name, len(data))
    with Image.open(path) as image:
        image.load()  # decodes every row: a cut-off file fails here
        assert image.size == SIZES[path.name]


def expected_files(report: dict[str, Any], with_answers: bool) -> set[str]:
    charts = {"lengths.png", "win_rates.png"}
    if report.get("pairs"):
        charts.add("margins.png")
    if report.get("checkpoints"):
        charts.add("checkpoints.png")
    return {"eval.json", "eval.md"} | charts | ({"answers.jsonl"} if with_answers else set())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# --- Markdown ------------------------------------------------------------------------------------------------


def test_the_markdown_has_every_section_and_the_figures() -> None:
    text = render_markdown(full_report())
    assert text.startswith("# Evaluation of `runs/sweep|beta=0.1` against `tiny-chat`\n")
    for heading in HEADINGS:
        assert f"\n{heading}\n" in text
    assert "| metric | base | tuned | change |" in text
    assert "| 0.68 [0.58, 0.78] |" in text  # the judge's win rate with its interval
    assert "| 0.60 [0.50, 0.70] |" in text  # length-controlled
    assert "-1.2 log-odds" in text
    assert "| 3.20 [2.80, 3.60] |" in text  # KL per answer
    assert "| 40.2 | 30.1 | -10.1 (-25%) |" in text  # mean length, base then tuned
    assert "Human blind A/B win rate (n=20)" in text
    assert "top-k off" in text and "seed 0" in text and "both orders" in text
    for chart in sorted(ALL_CHARTS):
        assert f"]({chart})" in text
    assert HOW_TO_READ in text
    assert "n/a" not in text  # everything was measured


def test_tables_keep_their_columns_and_answers_cannot_make_headings() -> None:
    text = render_markdown(full_report())
    found = tables(text)
    assert len(found) == 2  # the summary and the checkpoints
    for rows in found:
        assert len({cells(row) for row in rows}) == 1, rows
    # The only headings are the report's own: a prompt's "#" and an answer's "##" stay text in their quotes
    headings = {line for line in text.splitlines() if line.lstrip().startswith("#")}
    assert headings - HEADINGS == {text.splitlines()[0], "### Example 1", "### Example 2", "### Example 3"}
    assert "> \\# Not a heading \\| nor a cell\\\n> 1\\. not a list\\\n> \\> not a quote\n" in text
    assert "> \\## also not a heading" in text
    assert "**Base** — not preferred" in text and "**Tuned** — preferred" in text
    assert "> *(empty)*" in text


def test_what_was_not_measured_reads_n_a() -> None:
    text = render_markdown(partial_report())
    assert "| Held-out pairs: reward accuracy | — | n/a | — |" in text
    assert "Human blind" not in text
    assert "## Checkpoints" not in text
    assert "margins.png" not in text and "checkpoints.png" not in text
    bare = render_markdown({"version": 1})  # nothing at all: still a whole report
    for heading in HEADINGS - {"## Checkpoints"}:
        assert f"\n{heading}\n" in bare
    assert "| Judge win rate, tuned over base (ties half) | — | n/a | — |" in bare
    assert "No charts" in bare and "No examples" in bare


# --- charts --------------------------------------------------------------------------------------------------


def test_charts_are_small_valid_pngs_and_the_same_bytes_twice(tmp_path: Path) -> None:
    first = render_charts(full_report(), tmp_path / "one")
    second = render_charts(full_report(), tmp_path / "two")
    assert set(first) == ALL_CHARTS and first == second
    for name in first:
        assert_valid_png(tmp_path / "one" / name)
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_only_the_charts_that_apply_are_drawn(tmp_path: Path) -> None:
    assert render_charts(partial_report(), tmp_path) == ["lengths.png", "win_rates.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lengths.png", "win_rates.png"]
    assert render_charts({"version": 1, "judge": None, "lengths": None}, tmp_path / "none") == []


# --- the report folder ---------------------------------------------------------------------------------------


def test_write_report_writes_exactly_the_report_and_a_second_replaces_it(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "eval"
    report = full_report()
    report["kl"]["per_token"] = float("nan")  # not JSON: written as null
    assert write_report(folder, report, answers()) == folder
    assert {path.name for path in folder.iterdir()} == expected_files(report, with_answers=True)
    assert sorted(path.name for path in folder.parent.iterdir()) == ["eval"]
    saved = json.loads((folder / "eval.json").read_text())
    assert saved["kl"]["per_token"] is None and saved["judge"] == report["judge"]
    assert read_report(folder) == saved
    assert [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()] == answers()
    assert (folder / "eval.md").read_text() == render_markdown(report)
    # The second report has no answers, margins or checkpoints: nothing of the first one may linger
    second = partial_report()
    write_report(folder, second)
    assert {path.name for path in folder.iterdir()} == expected_files(second, with_answers=False)
    assert read_report(folder) == second
    assert sorted(path.name for path in folder.parent.iterdir()) == ["eval"]


def test_a_failure_half_way_leaves_the_previous_report_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "eval"
    write_report(folder, partial_report(), answers())
    before = snapshot(folder)

    def charts_then_fail(report: dict[str, Any], where: Path) -> list[str]:
        (where / "lengths.png").write_bytes(b"half a chart")
        raise RuntimeError("the renderer died")

    monkeypatch.setattr(evaluation, "render_charts", charts_then_fail)
    with pytest.raises(RuntimeError, match="renderer died"):
        write_report(folder, full_report(), answers(1))
    assert snapshot(folder) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["eval"]  # no temporary left beside it


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_a_killed_writer_are_recovered_or_removed(tmp_path: Path) -> None:
    folder = tmp_path / "eval"
    write_report(folder, partial_report())
    previous = snapshot(folder)
    gone = dead_pid()
    # Killed between its two renames: the previous report set aside, the new one complete but not in place
    folder.rename(tmp_path / f".tmp-old-eval.{gone}")
    (tmp_path / f".tmp-eval.{gone}").mkdir()
    (tmp_path / f".tmp-eval.{gone}" / "eval.json").write_text("{")
    other = tmp_path / f".tmp-eval.old.{gone}"  # another report's leftover ("eval.old"): not this one's
    other.mkdir()
    alive = tmp_path / f".tmp-eval.{os.getppid()}"  # a writer that is still running
    alive.mkdir()
    assert read_report(folder) == json.loads(previous["eval.json"])
    assert snapshot(folder) == previous
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["eval", other.name, alive.name])
    # Killed after the swap, while deleting the old report: the stray copy goes on the next write
    stray = tmp_path / f".tmp-old-eval.{gone}"
    stray.mkdir()
    write_report(folder, small_report("next"))
    assert read_report(folder) == small_report("next")
    assert not stray.exists() and alive.exists()


# --- SIGKILL -------------------------------------------------------------------------------------------------


def in_child(work: Any) -> int:
    """Run ``work`` in a forked copy of this process (no interpreter start-up to wait for); return its pid.
    The child never returns into pytest: it exits when ``work`` does, or dies by SIGKILL."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()  # the parent sees only the exit code: say why here
        finally:
            os._exit(code)
    return pid


def wait_killed(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the writer neither finished nor died in time")


def write_with_fault(folder: Path, report: dict[str, Any], point: str) -> None:
    os.environ["DUET_FAULT"] = point
    importlib.reload(faults)  # core.atomic reads the armed point through this module
    write_report(folder, report, answers(2))


def assert_whole(folder: Path, candidates: list[tuple[dict[str, Any], bool]]) -> dict[str, Any]:
    """``folder`` holds one of the candidate reports, complete: every file, each whole."""
    saved = json.loads((folder / "eval.json").read_text())
    matches = [(report, with_answers) for report, with_answers in candidates if report == saved]
    assert matches, "the report is none of those written"
    report, with_answers = matches[0]
    assert {path.name for path in folder.iterdir()} == expected_files(report, with_answers)
    assert (folder / "eval.md").read_text() == render_markdown(report)
    for chart in ALL_CHARTS & {path.name for path in folder.iterdir()}:
        assert_valid_png(folder / chart)
    if with_answers:
        assert len((folder / "answers.jsonl").read_text().splitlines()) == 2
    return saved


@pytest.mark.parametrize(
    "point",
    [
        "write.partial:2",  # half-way through writing eval.md
        "write.rename:4",  # a chart written, not yet renamed into the temporary folder
        "dir.rename:1",  # the new report complete, not yet swapped in
        "dir.swap:1",  # between the two renames: the old report set aside, the new one not in place
    ],
)
def test_a_sigkill_at_each_point_of_a_write_keeps_the_previous_report(tmp_path: Path, point: str) -> None:
    folder = tmp_path / "eval"
    first = small_report("first")
    write_report(folder, first)
    before = snapshot(folder)
    status = wait_killed(in_child(lambda: write_with_fault(folder, small_report("second"), point)))
    assert status == -signal.SIGKILL
    if point == "dir.swap:1":
        assert not folder.exists()  # the one moment with no report in place; recovery puts it back
    else:
        assert snapshot(folder) == before
    assert read_report(folder) == first and snapshot(folder) == before
    write_report(folder, small_report("third"))
    assert read_report(folder) == small_report("third")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["eval"]


def test_sigkill_at_random_moments_leaves_a_whole_report(tmp_path: Path) -> None:
    folder = tmp_path / "eval"
    big, small = full_report(seed=1, size=400), small_report("small")
    candidates = [(big, True), (small, False)]
    write_report(folder, small)

    def write_forever() -> None:
        while True:
            write_report(folder, big, answers(2))
            write_report(folder, small)

    rng = random.Random(0)
    for _ in range(4):
        pid = in_child(write_forever)
        time.sleep(rng.uniform(0.05, 1.5))  # a cycle writes both reports in about that long
        os.kill(pid, signal.SIGKILL)
        assert wait_killed(pid) == -signal.SIGKILL
        if folder.exists():  # else it was killed between the two renames, the previous report set aside
            assert_whole(folder, candidates)
        recover_report(folder)
        assert_whole(folder, candidates)
    write_report(folder, small)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["eval"]


# --- comparing runs ------------------------------------------------------------------------------------------


def test_compare_puts_runs_side_by_side() -> None:
    tuned = full_report()
    unmeasured = copy.deepcopy(partial_report())
    unmeasured.update(training=None, kl=None, length_controlled=None, degeneration=None)
    unmeasured["lengths"] = {"base": [10, 20], "tuned": [30, 50]}
    reports = [("β=0.1|dpo", tuned), ("plain", unmeasured)]
    rows = compare_rows(reports)
    assert [row["label"] for row in rows] == ["β=0.1|dpo", "plain"]
    assert rows[0]["beta"] == 0.1 and rows[0]["kl_per_answer"] == 3.2 and rows[1]["beta"] is None
    assert rows[1]["mean_tokens_tuned"] == 40.0  # from the raw lengths when no statistics were kept
    text = render_compare(reports)
    lines = text.splitlines()
    assert len(lines) == 4 and len({cells(line) for line in lines}) == 1
    assert lines[2].startswith("| β=0.1\\|dpo | dpo | 0.100 | 120 | 0.68 [0.58, 0.78] | 0.60 | 3.20 | 0.080 |")
    assert lines[3] == "| plain | n/a | n/a | n/a | 0.68 [0.58, 0.78] | n/a | n/a | n/a | 40.0 (15.0) | n/a |"
