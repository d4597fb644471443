"""Running Duet as users do (a subprocess of `python -m core.run`), with faults injected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors.numpy import load_file

from core.metrics import read_metrics
from tests.helpers import DEMO_MODEL, write_demo_subset

ROOT = Path(__file__).resolve().parents[2]
TIMING = {"time", "elapsed", "eta", "tokens_per_second", "memory"}


def write_config(folder: Path, **train: Any) -> Path:
    """A small, fully deterministic run: LoRA dropout on, so resuming must restore the RNG too."""
    folder.mkdir(parents=True, exist_ok=True)
    data = write_demo_subset(folder / "prefs.jsonl", count=48)
    config = {
        "model": {"path": str(DEMO_MODEL), "backend": "torch", "device": "cpu"},
        "data": {"train": str(data), "eval_fraction": 0.125, "max_length": 128, "max_prompt_length": 64},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
        "objective": {"name": "dpo", "beta": 0.1},
        "train": {
            "batch_size": 4,
            "max_steps": 8,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "save_every": 2,
            "eval_every": 4,
            "keep_checkpoints": 2,
            "run_name": "run",
            "output_dir": str(folder / "runs"),
            "cache_dir": str(folder / "cache"),
            **train,
        },
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def duet(*args: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DUET_FAULT", None)
    if fault:
        env["DUET_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "core.run", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_dir(folder: Path) -> Path:
    return folder / "runs" / "run"


def adapter(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir(folder) / "adapter" / "adapter_model.safetensors"))


def step_metrics(folder: Path) -> list[dict]:
    events = read_metrics(run_dir(folder) / "metrics.jsonl")
    return [{k: v for k, v in e.to_json().items() if k not in TIMING} for e in events if e.type in ("train", "eval")]


def assert_same_run(folder: Path, baseline: Path, tolerance: float = 1e-6) -> None:
    """Same per-step metrics and the same final adapter as the uninterrupted run."""
    ours, theirs = step_metrics(folder), step_metrics(baseline)
    assert [(e["type"], e["step"]) for e in ours] == [(e["type"], e["step"]) for e in theirs]
    for mine, expected in zip(ours, theirs, strict=True):
        for key, value in expected.items():
            if isinstance(value, float):
                assert abs(mine[key] - value) <= tolerance * max(1.0, abs(value)), (mine["step"], key)
    got, want = adapter(folder), adapter(baseline)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=tolerance, atol=tolerance, err_msg=key)


def assert_intact(folder: Path) -> None:
    """After a crash: every checkpoint complete and loadable, the metrics readable, no half-written names."""
    directory = run_dir(folder)
    for checkpoint in (directory / "checkpoints").glob("step-*"):
        files = {p.name for p in checkpoint.iterdir()}
        assert {
            "adapter_model.safetensors",
            "optimizer.safetensors",
            "rng.safetensors",
            "trainer_state.json",
        } <= files, checkpoint
        for name in ("adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors"):
            load_file(str(checkpoint / name))
    read_metrics(directory / "metrics.jsonl")
    adapter_dir = directory / "adapter"
    if adapter_dir.exists():
        load_file(str(adapter_dir / "adapter_model.safetensors"))
    for cache in (folder / "cache" / "reference").glob("*.safetensors"):
        load_file(str(cache))
