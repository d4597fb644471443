"""MLX end to end: QLoRA on a 4-bit model, the demo on MLX, `duet doctor`."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

pytest.importorskip("mlx.core")

from core.cli import main as duet
from core.run import run
from tests.helpers import DEMO_MODEL, quick_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_qlora_on_a_4bit_model_trains_and_its_adapter_loads_in_mlx_lm(tmp_path: Path) -> None:
    from mlx_lm import convert, generate, load

    quantized = tmp_path / "tiny-4bit"
    convert(str(DEMO_MODEL), mlx_path=str(quantized), quantize=True, q_group_size=64, q_bits=4)
    config = quick_config(
        tmp_path,
        model={"backend": "mlx", "path": str(quantized)},
        lora={"rank": 8, "alpha": 16},
        train={"max_steps": 12, "lr": 2e-3, "eval_every": 4},
    )
    result = run(config, console=Console(file=io.StringIO()))
    evals = [e for e in result.events if e["type"] == "eval"]
    losses = [e["loss"] for e in result.events if e["type"] == "train"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and losses[-1] < losses[0]
    assert evals[-1]["eval_rewards/accuracies"] >= evals[0]["eval_rewards/accuracies"]
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    model, tokenizer = load(str(quantized), adapter_path=str(result.adapter_dir))
    text = generate(
        model, tokenizer, "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n", max_tokens=6
    )
    assert isinstance(text, str) and text


@pytest.mark.slow
def test_the_demo_on_mlx(tmp_path: Path) -> None:
    """The README's demo with backend=mlx (CPU here): the same held-out accuracy bar as on torch."""
    env = {**os.environ, "DUET_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "core.run", "model.backend=mlx", f"train.output_dir={tmp_path / 'runs'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"held-out reward accuracy ([\d.]+)", result.stdout).group(1))
    before, after = (int(x) for x in re.search(r"(\d+)% before → (\d+)% after", result.stdout).groups())
    assert accuracy >= 0.9 and after - before >= 50, result.stdout[-2000:]
    assert "on mlx" in result.stdout


def test_doctor_reports_both_backends(capsys) -> None:
    assert duet(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "mlx" in out and "backend auto →" in out
    assert "CPU build: correct but slow" in out or "memory" in out
