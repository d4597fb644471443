"""Graceful stops: SIGINT and SIGTERM save a checkpoint and exit 0 saying how to resume; a second Ctrl-C
quits at once, and what was written stays intact and resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from core.metrics import read_metrics
from tests.faults.support import ROOT, assert_intact, duet, run_dir, write_config

pytestmark = pytest.mark.slow


def start(config: Path, stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DUET_FAULT", None)
    return subprocess.Popen(
        [sys.executable, "-m", "core.run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=stdout,
        stderr=stderr,
        text=True,
    )


def wait_for_training(folder: Path, process: subprocess.Popen, steps: int = 2) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        events = read_metrics(run_dir(folder) / "metrics.jsonl") if run_dir(folder).exists() else []
        if sum(e["type"] == "train" for e in events) >= steps:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise AssertionError("the run never started training")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_and_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    config = write_config(tmp_path, max_steps=100000, save_every=None)
    process = start(config)
    wait_for_training(tmp_path, process)
    process.send_signal(sig)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-2000:]
    assert f"received {sig.name}" in out and "resume with: python -m core.run --resume" in out
    checkpoints = list((run_dir(tmp_path) / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1  # save_every is off: this checkpoint is the signal's
    assert_intact(tmp_path)
    resumed = duet("--resume", str(run_dir(tmp_path)), f"train.max_steps={int(checkpoints[0].name[5:]) + 2}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_a_second_ctrl_c_quits_at_once_without_corrupting_anything(tmp_path: Path) -> None:
    config = write_config(tmp_path, max_steps=100000, save_every=2)
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_file.open("w") as stdout, err_file.open("w") as stderr:
        process = start(config, stdout, stderr)
        wait_for_training(tmp_path, process, steps=3)
        process.send_signal(signal.SIGINT)
        # as a person does: the second Ctrl-C after the first was answered (two signals sent before the
        # process runs again are one signal to the kernel, so sending both at once would test nothing)
        deadline = time.monotonic() + 60
        while "stopping after this step" not in out_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    out, err = out_file.read_text(), err_file.read_text()
    assert process.returncode == 130, (out[-1000:], err[-2000:])
    assert "interrupted at once; the newest checkpoint is intact" in err and "Traceback" not in err
    assert_intact(tmp_path)
    newest = max(int(p.name[5:]) for p in (run_dir(tmp_path) / "checkpoints").glob("step-*"))
    resumed = duet("--resume", str(run_dir(tmp_path)), f"train.max_steps={newest + 2}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_intact(tmp_path)


LATE_SECOND_SIGNAL = """
import os, signal, time
from app.signals import stop_on_signals
from core.trainer import RunControl

control = RunControl()
with stop_on_signals(control, print, True):
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: the loop stops and saves
    deadline = time.monotonic() + 10
    while not control.stop_requested and time.monotonic() < deadline:
        time.sleep(0.01)
    assert control.stop_requested
os.kill(os.getpid(), signal.SIGINT)  # the second lands while the process winds down
time.sleep(5)
print("still running")
"""


TWO_SIGNALS_DURING_ONE_NATIVE_CALL = """
import hashlib, os, signal, threading, time
from app.signals import stop_on_signals
from core.trainer import RunControl

control = RunControl()
said, seen = [], []

hashing = threading.Event()

def press_ctrl_c_twice():
    hashing.wait()
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    seen.append(len(said))  # answered while the call still runs?
    os.kill(os.getpid(), signal.SIGINT)
    seen.append(time.monotonic())

try:
    with stop_on_signals(control, said.append, True):
        threading.Thread(target=press_ctrl_c_twice).start()
        # one native call that runs no Python code for a second or more, as a big matmul does
        hashing.set()
        hashlib.sha256(bytes(3 << 30)).hexdigest()
        time.sleep(0.01)
        print("not interrupted")
except KeyboardInterrupt:
    # the call went on well after the second press: both landed inside it
    print("interrupted", control.stop_requested, seen[0], time.monotonic() - seen[1] > 0.3)
"""


def test_both_ctrl_c_count_while_the_main_thread_is_in_one_long_native_call() -> None:
    """The first is answered while the call runs, and the second quits as soon as the call returns."""
    done = subprocess.run(
        [sys.executable, "-c", TWO_SIGNALS_DURING_ONE_NATIVE_CALL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "interrupted True 1 True", done.stdout


GONE_CONSOLE = """
import os, signal, time
from app.signals import stop_on_signals
from core.trainer import RunControl

control = RunControl()

def say(message):
    raise BrokenPipeError("stdout was piped into head, which has exited")

try:
    with stop_on_signals(control, say, True):
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 10
        while not control.stop_requested and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        print("not interrupted")
except KeyboardInterrupt:
    print("interrupted", control.stop_requested)
"""


def test_a_console_that_is_gone_does_not_make_ctrl_c_deaf() -> None:
    done = subprocess.run([sys.executable, "-c", GONE_CONSOLE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "interrupted True", (done.stdout, done.stderr[-2000:])


def test_a_second_ctrl_c_after_the_last_save_still_quits_at_once() -> None:
    """The second Ctrl-C can land after the run has left its loop; it must not become a finalizer's traceback."""
    done = subprocess.run(
        [sys.executable, "-c", LATE_SECOND_SIGNAL], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 130, done.stderr[-2000:]
    assert "interrupted at once; the newest checkpoint is intact" in done.stderr
    assert "Traceback" not in done.stderr and "still running" not in done.stdout
