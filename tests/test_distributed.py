"""torchrun on the CPU (gloo): two processes equal one process with the same global batch; a rank that
dies ends the job (non-zero, within the timeout) with the checkpoint intact, and the job resumes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.faults.support import ROOT, adapter, assert_intact, assert_same_run, duet, run_dir, write_config

pytestmark = pytest.mark.slow


def config(folder: Path, model: dict | None = None, **train) -> Path:
    path = write_config(folder, max_steps=6, save_every=2, eval_every=3, distributed_timeout=30, **train)
    settings = yaml.safe_load(path.read_text())
    settings["model"].update(model or {})
    settings["lora"]["dropout"] = 0.0  # the ranks draw different dropout masks than one process would
    settings["data"]["eval_fraction"] = 0.1667  # 40 training pairs: whole global batches, same epochs
    path.write_text(yaml.safe_dump(settings))
    return path


def torchrun(
    *args: str, processes: int = 2, fault: str | None = None, fault_rank: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("DUET_FAULT", None)
    if fault:
        env["DUET_FAULT"] = fault
        env["DUET_FAULT_RANK"] = str(fault_rank)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "core.run",
        *args,
    ]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("per_device", "accumulation"), [(2, 1), (1, 2)], ids=["batch-x2", "accumulation-2"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path: Path, per_device: int, accumulation: int):
    single = duet("--config", str(config(tmp_path / "single", batch_size=per_device * 2, grad_accum=accumulation)))
    assert single.returncode == 0, single.stderr[-2000:]
    double = torchrun("--config", str(config(tmp_path / "ddp", batch_size=per_device, grad_accum=accumulation)))
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-3000:]
    assert "2 processes" in double.stdout
    assert_same_run(tmp_path / "ddp", tmp_path / "single", tolerance=1e-5)
    assert adapter(tmp_path / "ddp").keys() == adapter(tmp_path / "single").keys()


def test_pair_by_pair_steps_under_torchrun(tmp_path: Path):
    """Rows one by one (the demo's are short, so forced here), so each rank's step runs forward and backward
    one pair at a time and exchanges gradients after its last pair only: still one process's run."""
    row_by_row = {"padding_free": True}
    single = duet("--config", str(config(tmp_path / "single", row_by_row, batch_size=4, grad_accum=1)))
    assert single.returncode == 0, single.stderr[-2000:]
    double = torchrun("--config", str(config(tmp_path / "ddp", row_by_row, batch_size=2, grad_accum=1)))
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-3000:]
    assert_same_run(tmp_path / "ddp", tmp_path / "single", tolerance=1e-5)


def test_a_dying_rank_stops_the_job_and_the_job_resumes(tmp_path: Path):
    folder = tmp_path / "job"
    started = time.monotonic()
    killed = torchrun("--config", str(config(folder, batch_size=2)), fault="step.updated:5", fault_rank=1)
    elapsed = time.monotonic() - started
    assert killed.returncode != 0
    assert elapsed < 120, f"the job took {elapsed:.0f}s to notice a dead rank (timeout 30s)"
    assert_intact(folder)
    assert sorted(p.name for p in (run_dir(folder) / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    resumed = torchrun("--resume", str(run_dir(folder)))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert_intact(folder)
    uninterrupted = torchrun("--config", str(config(tmp_path / "whole", batch_size=2)))
    assert uninterrupted.returncode == 0
    assert_same_run(folder, tmp_path / "whole", tolerance=1e-5)


def test_warm_caches_under_torchrun(tmp_path: Path):
    """The second torchrun job on the same data finds the reference log-probs and the tokens in the cache (rank 0
    reads them, the other ranks receive them), trains the same adapter, and a job resumed on warm caches ends
    the same way too."""
    cache = str(tmp_path / "cache")
    cold = torchrun("--config", str(config(tmp_path / "cold", batch_size=2, cache_dir=cache)))
    assert cold.returncode == 0, cold.stdout[-2000:] + cold.stderr[-3000:]
    assert "cache hit" not in cold.stdout
    warm = torchrun("--config", str(config(tmp_path / "warm", batch_size=2, cache_dir=cache)))
    assert warm.returncode == 0, warm.stdout[-2000:] + warm.stderr[-3000:]
    assert "reference log-probs (train, 40 pairs): cache hit" in warm.stdout
    assert "tokenized pairs: reused from the cache" in warm.stdout
    assert_same_run(tmp_path / "warm", tmp_path / "cold", tolerance=1e-6)

    folder = tmp_path / "resumed"
    killed = torchrun(
        "--config", str(config(folder, batch_size=2, cache_dir=cache)), fault="step.updated:3", fault_rank=1
    )
    assert killed.returncode != 0 and "cache hit" in killed.stdout
    resumed = torchrun("--resume", str(run_dir(folder)))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert_same_run(folder, tmp_path / "cold", tolerance=1e-5)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, (1, 2, 1)),
        ({"WORLD_SIZE": "1", "RANK": "0"}, None),  # another launcher's single process: plain
        ({"WORLD_SIZE": "1", "RANK": "0", "TORCHELASTIC_RUN_ID": "x"}, (0, 1, 0)),  # torchrun, one process
    ],
)
def test_torchrun_is_recognized_even_with_one_process(monkeypatch, env: dict, expected) -> None:
    """`torchrun --nproc_per_node 1` forms a process group and wraps the model in DDP (the NCCL path on one GPU)."""
    from core.distributed import Collective, torchrun_environment

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert torchrun_environment() == expected
    assert Collective(world_size=1, launched=True).enabled and not Collective().enabled
