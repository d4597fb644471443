"""SIGKILL while a person collects in the Collect screen (a subprocess driven by Textual's pilot): in the
middle of generating a pair, half-way through writing a judgement, right after a key wrote one. The file
parses, nothing judged before the kill is lost, and reopening it resumes at the next unjudged prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.collect import JudgementsFile, read_prompts, remaining

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Name a tree.", "Name a river.", "Name a bird.", "Name a fish.", "Name a city.", "Name a star."]

DRIVER = """
import asyncio, sys, time
from app.api import resolve_config
from tui.app import DuetApp

prompts, out, keys = sys.argv[1], sys.argv[2], sys.argv[3]

async def main():
    config = resolve_config(None, ["sampling.max_new_tokens=16", "train.cache_dir=" + sys.argv[4]])
    app = DuetApp(config, collect=(config, prompts, out))
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        for key in keys:
            deadline = time.monotonic() + 60
            while True:  # the pair on screen has finished generating
                session = getattr(screen, "session", None)
                answers = session.current() if session is not None else None
                if answers is not None and answers.done:
                    break
                assert time.monotonic() < deadline, "no pair to judge"
                await pilot.pause(0.05)
            await pilot.press(key)
            await pilot.pause(0.05)
        print("all keys pressed", flush=True)

asyncio.run(main())
"""


def drive(tmp_path: Path, keys: str, fault: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DUET_FAULT", None)
    if fault:
        env["DUET_FAULT"] = fault
    script = tmp_path / "drive.py"
    script.write_text(DRIVER)
    command = [sys.executable, str(script), str(tmp_path / "prompts.txt"), str(tmp_path / "out.jsonl"), keys]
    return subprocess.run(
        [*command, str(tmp_path / "cache")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "kept"),
    [
        ("collect.generate:1", 0),  # the first pairs generated, nothing judged yet
        ("collect.write:3", 2),  # half-way through writing the third judgement
        ("collect.written:2", 2),  # right after the key that wrote the second judgement
    ],
)
def test_a_kill_while_collecting_loses_nothing_judged(tmp_path: Path, fault: str, kept: int) -> None:
    (tmp_path / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    out = tmp_path / "out.jsonl"
    killed = drive(tmp_path, "1t2x", fault)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    data = out.read_bytes() if out.exists() else b""
    complete = [json.loads(line) for line in data.split(b"\n")[:-1]]  # every whole line parses
    assert len(complete) == kept
    with JudgementsFile(out) as file:  # a line cut short is dropped on opening; the rest is intact
        assert [r["duet"]["verdict"] for r in file.records] == [r["duet"]["verdict"] for r in complete]
        left = list(remaining(read_prompts(tmp_path / "prompts.txt"), file.judged_keys()))
    assert [p.text for _, p in left] == PROMPTS[kept:]

    again = drive(tmp_path, "s", None)  # reopened: the screen resumes at the next prompt and judges it
    assert again.returncode == 0, again.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == kept + 1 and rows[-1]["duet"]["verdict"] == "skip"
    assert rows[-1]["prompt"][0]["content"] == PROMPTS[kept]
