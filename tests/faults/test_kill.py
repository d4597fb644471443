"""Kill at any moment: a run killed with SIGKILL at each of these points leaves every checkpoint, cache
entry and export intact; `--resume` then ends with the same metrics and adapter as an uninterrupted run
(1e-6, CPU)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.faults.support import assert_intact, assert_same_run, duet, run_dir, write_config

pytestmark = pytest.mark.slow

# point:n → the n-th time the run reaches the point (core/faults.py). The write counts follow the order of
# a fresh run's file writes: 1 the tokenized-pairs cache, 2 run.json, 3 config.yaml, 4 the cache's
# file-digest memo, 5 the reference cache (train), 6 its copy in the run, 7-8 the same for eval, then each
# checkpoint's optimizer.safetensors, optimizer.json, rng.safetensors and trainer_state.json (9-12 for
# step 2, 13-16 for step 4).
KILL_POINTS = {
    "in the middle of a training step": "step.backward:3",
    "after an update, before it is logged or saved": "step.updated:5",
    "after the last update, before the last checkpoint": "step.updated:8",
    "half-way through writing the model's file-digest memo": "write.partial:4",
    "half-way through writing the reference cache": "write.partial:5",
    "while computing reference log-probs": "reference.batch:2",
    "just before renaming the run's copy of the reference": "write.rename:6",
    "inside a checkpoint, after the adapter": "checkpoint.adapter:2",
    "inside a checkpoint, after the optimizer state": "checkpoint.optimizer:1",
    "half-way through a checkpoint file": "write.partial:14",
    "just before a checkpoint folder is renamed into place": "dir.rename:2",
    "while deleting an old checkpoint": "checkpoint.prune:1",
    "half-way through a metrics line": "metrics.line:9",
    "during evaluation": "eval.batch:1",
    "while exporting the final adapter": "export.adapter:1",
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("baseline")
    result = duet("--config", str(write_config(folder)))
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


def test_there_are_at_least_ten_kill_points() -> None:
    assert len(KILL_POINTS) >= 10


@pytest.mark.parametrize("where", sorted(KILL_POINTS))
def test_killed_then_resumed_equals_uninterrupted(baseline: Path, tmp_path: Path, where: str) -> None:
    config = write_config(tmp_path)
    killed = duet("--config", str(config), fault=KILL_POINTS[where])
    assert killed.returncode == -signal.SIGKILL, f"the fault never fired: {killed.stdout[-1500:]}"
    assert_intact(tmp_path)
    resumed = duet("--resume", str(run_dir(tmp_path)))
    assert resumed.returncode == 0, resumed.stdout[-1500:] + resumed.stderr[-2000:]
    assert_intact(tmp_path)
    assert_same_run(tmp_path, baseline)
    assert not list(run_dir(tmp_path).rglob(".tmp-*")), "temporaries left behind"


def test_killed_while_caching_the_tokens_then_run_again_equals_uninterrupted(baseline: Path, tmp_path: Path) -> None:
    """Before the run directory exists there is nothing to resume: the same command again must just work,
    with the half-written cache entry neither read nor left behind."""
    config = write_config(tmp_path)
    killed = duet("--config", str(config), fault="write.partial:1")
    assert killed.returncode == -signal.SIGKILL, f"the fault never fired: {killed.stdout[-1500:]}"
    assert not list((tmp_path / "cache" / "tokenized").glob("*.safetensors"))  # nothing half-written in place
    again = duet("--config", str(config))
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_run(tmp_path, baseline)
    assert [p.suffix for p in (tmp_path / "cache" / "tokenized").iterdir()] == [".safetensors"]
