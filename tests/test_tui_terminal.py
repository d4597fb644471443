"""The app in a real terminal: started in tmux, driven with send-keys from set-up to a running demo, the
screen captured and asserted on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from models.tiny_chat import CONFIG_FILE

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=False).stdout


def wait_for_screen(session: str, predicate, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if predicate(screen):
            return screen
        time.sleep(0.3)
    raise AssertionError(f"the screen never showed what was expected; last capture:\n{screen}")


@pytest.mark.slow
def test_setup_to_a_running_demo_in_tmux(tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG_FILE.read_text())
    config["train"].update(output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), max_steps=400)
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(yaml.safe_dump(config))
    session = f"duet-test-{os.getpid()}"
    command = f"cd {ROOT} && {sys.executable} -m core.cli tui --config {config_file}"
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", command)
    try:
        setup = wait_for_screen(session, lambda s: "settings from" in s and "Start" in s, timeout=60)
        assert "Model" in setup and "Objective" in setup and "f5" in setup.lower()
        tmux("send-keys", "-t", session, "F5")
        running = wait_for_screen(session, lambda s: "TRAINING" in s and "step" in s and "loss" in s)
        assert "reward margin" in running and "reward accuracy" in running
        wait_for_screen(session, lambda s: any(f"step {n}/400" in s for n in range(5, 400)))
        tmux("send-keys", "-t", session, "p")
        wait_for_screen(session, lambda s: "PAUSED" in s)
        tmux("send-keys", "-t", session, "p")
        wait_for_screen(session, lambda s: "TRAINING" in s)
        tmux("send-keys", "-t", session, "q")
        wait_for_screen(session, lambda s: "Stop and quit" in s)
        tmux("send-keys", "-t", session, "y")
        deadline = time.monotonic() + 60
        while session in tmux("list-sessions") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert session not in tmux("list-sessions"), "the app did not exit after stop-and-quit"
        checkpoints = list((tmp_path / "runs").glob("*/checkpoints/step-*"))
        assert checkpoints, "stop-and-quit saves a checkpoint"
    finally:
        tmux("kill-session", "-t", session)
