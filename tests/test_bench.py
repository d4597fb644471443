"""The bench measures what a user's run does: its variants are config settings, its backends come from the
factory, its steps are the trainer's; variants that compute the same maths differently agree."""

from __future__ import annotations

import contextlib
import math

import pytest

from bench import worker
from bench.workloads import WORKLOADS

DEMO = WORKLOADS["demo"]


def test_every_duet_variant_is_a_valid_config_with_its_settings() -> None:
    for name, variant in worker.VARIANTS.items():
        if variant.tool != "duet":
            continue
        config = worker.duet_config(DEMO, variant, steps=3, device="cpu", dtype="auto")
        assert config.model.backend == variant.settings["model.backend"], name
        assert config.train.shuffle is False and config.train.max_steps == 3
        assert config.objective.name == "dpo" and config.objective.beta == DEMO.beta
    unshared = worker.duet_config(DEMO, worker.VARIANTS["duet-torch-unshared"], 3, "cpu", "auto")
    assert unshared.model.share_prompts is False
    checkpointed = worker.duet_config(DEMO, worker.VARIANTS["duet-mlx-gc"], 3, "cpu", "auto")
    assert checkpointed.model.gradient_checkpointing is True and checkpointed.model.dtype == "float32"


def test_trl_variants_pass_their_settings_to_dpo_config() -> None:
    assert worker.VARIANTS["trl"].settings == {}
    assert worker.VARIANTS["trl-precompute"].settings == {"precompute_ref_log_probs": True}
    assert worker.VARIANTS["trl-liger"].settings == {"use_liger_kernel": True}


def test_the_torch_variants_train_the_same_losses() -> None:
    """Prompt sharing, gradient checkpointing and the full-logits path change how, not what: the same losses
    step by step (float32: 1e-5 relative), and the first step is exactly ln 2 (B starts at zero)."""
    runs = {
        name: worker.measure_duet(DEMO, worker.VARIANTS[name], steps=3, device="cpu", dtype="float32")
        for name in ("duet-torch", "duet-torch-unshared", "duet-torch-gc", "duet-torch-naive")
    }
    base = runs["duet-torch"]["losses"]
    assert base[0] == pytest.approx(math.log(2), abs=1e-6)
    assert base[1] != pytest.approx(math.log(2), abs=1e-7)  # the first update moved the policy
    for name, figures in runs.items():
        assert figures["variant"] == name and figures["steps"] == 3
        assert figures["losses"] == pytest.approx(base, rel=1e-5), name


def test_the_reference_pass_bench_compares_the_same_log_probs(tmp_path) -> None:
    import json

    from bench import reference_pass

    out = tmp_path / "reference.json"
    assert reference_pass.main(["--workload", "demo", "--pairs", "12", "--batch-size", "4", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["pairs"] == 12 and figures["duet"]["batches"] <= figures["duet, fixed pairs"]["batches"]
    for name in ("duet, fixed pairs", "transformers"):
        assert figures[name]["max_abs_logp_difference_to_duet"] < 1e-4  # float32 sums of ~30 tokens
        assert figures[name]["tokens_per_second"] > 0


def test_cpu_mfu_is_measured_against_this_machines_gemm_on_the_rows_threads() -> None:
    from bench.flops import add_cpu_mfu, measured_gemm_tflops

    peak = measured_gemm_tflops(1, size=256, repeats=2)
    assert 0 < peak < 100  # TFLOP/s: one CPU thread
    rows = [
        {"variant": "a", "threads": 1, "total_seconds": 2.0, "seconds_per_step": 0.5, "steps": 3},
        {"variant": "b", "error": "failed"},
    ]
    add_cpu_mfu(rows, flops=3e9)
    row = rows[0]
    assert row["peak_source"] == "measured fp32 GEMM, 1 thread" and row["peak_tflops"] > 0
    assert row["mfu"] == pytest.approx(3e9 / 2.0 / (row["peak_tflops"] * 1e12))
    assert row["step_mfu"] == pytest.approx(3e9 * 2 / 3 / 3 / 0.5 / (row["peak_tflops"] * 1e12))
    assert "mfu" not in rows[1]


def test_the_step_profile_puts_every_operator_in_a_group(capsys) -> None:
    from bench import profile_step

    assert profile_step.group_of("aten::mm") == "matrix products"
    assert profile_step.group_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert profile_step.group_of("aten::_foreach_lerp_") == "optimizer (AdamW)"
    assert profile_step.group_of("aten::logsumexp") == "softmax / log-softmax"
    assert profile_step.main(["--workload", "demo", "--steps", "1"]) == 0
    shown = capsys.readouterr().out
    assert "matrix products" in shown and "outside operators" in shown


def test_a_load_that_starts_at_a_step_runs_only_from_that_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """--load-from-step K: the background load starts when step K begins and stops when the measurement ends;
    the row's loaded throughput counts only the steps from K on."""
    from core import trainer

    steps_run: list[int] = []
    entered: list[tuple[int, int]] = []
    exited: list[int] = []
    real_step = trainer.optimizer_step
    monkeypatch.setattr(trainer, "optimizer_step", lambda *a, **k: steps_run.append(1) or real_step(*a, **k))

    @contextlib.contextmanager
    def recorded_load(count: int):
        entered.append((count, len(steps_run)))
        yield []
        exited.append(len(steps_run))

    monkeypatch.setattr(worker, "background_load", recorded_load)
    monkeypatch.setattr(worker, "LATE_LOAD", (1, 3))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a fixed count: no move, whatever this machine's load
    figures = worker.measure_duet(DEMO, worker.VARIANTS["duet-torch"], steps=4, device="cpu", dtype="float32")
    assert entered == [(1, 2)] and exited == [4]  # after two steps, before the third; gone after the last
    assert figures["load_from_step"] == 3 and figures["tokens_per_second_loaded"] > 0
    assert figures["thread_moves"] == []
