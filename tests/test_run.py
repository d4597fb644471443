"""Headless runs end to end: reference cache, resume, every objective, export, config errors, the demo."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import load_file

from core.events import Event, SampleReplies
from core.metrics import read_metrics
from core.objectives import OBJECTIVES
from core.run import main, run
from core.trainer import RunControl
from tests.helpers import quick_config

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"time", "elapsed", "eta", "tokens_per_second", "memory"}


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def numbers(event: Event) -> dict:
    return {k: v for k, v in event.to_json().items() if k not in TIMING_KEYS}


def test_reference_log_probs_are_cached_and_reused(tmp_path: Path) -> None:
    config = quick_config(tmp_path, train={"max_steps": 2})
    first = run(config, console=quiet())
    second = run(config, console=quiet())
    hits = [[e["cache_hit"] for e in r.events if e["type"] == "reference"] for r in (first, second)]
    assert hits == [[False, False], [True, True]]
    assert any("cache hit, reused" in e["message"] for e in second.events if e["type"] == "reference")
    assert first.final_metrics["loss"] == pytest.approx(second.final_metrics["loss"], rel=1e-6)
    # a truncation that changes the tokens is a different reference: no false hit
    third = run(quick_config(tmp_path, data={"max_prompt_length": 8}, train={"max_steps": 1}), console=quiet())
    assert [e["cache_hit"] for e in third.events if e["type"] == "reference"] == [False, False]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path: Path, objective: str) -> None:
    """Stopped at step 3 of 8 and resumed: same per-step metrics and the same adapter (1e-6). KTO too: its
    examples' mismatched replies are drawn again on resume, and must be the same ones."""
    settings = {"lora": {"dropout": 0.1}, "train": {"max_steps": 8, "save_every": 4, "eval_every": 2}}
    if objective == "kto":
        settings |= {"objective": {"name": "kto"}, "data": {"unpaired": True}}
    full = run(quick_config(tmp_path / "a", **settings), console=quiet())

    control = RunControl()

    def stop_at_three(event: dict) -> None:
        if event["type"] == "train" and event["step"] == 3:
            control.request_stop("test interruption")

    interrupted = run(
        quick_config(tmp_path / "b", **settings), console=quiet(), callback=stop_at_three, control=control
    )
    assert interrupted.stopped and interrupted.state.step == 3 and interrupted.adapter_dir is None
    assert (interrupted.run_dir / "checkpoints" / "step-00000003" / "trainer_state.json").is_file()
    resumed = run(resume=interrupted.run_dir, console=quiet())
    assert not resumed.stopped and resumed.state.step == 8

    def steps(run_dir: Path) -> list[dict]:
        return [numbers(e) for e in read_metrics(run_dir / "metrics.jsonl") if e["type"] in ("train", "eval")]

    expected, got = steps(full.run_dir), steps(resumed.run_dir)
    assert [(e["type"], e["step"]) for e in got] == [(e["type"], e["step"]) for e in expected]
    for mine, theirs in zip(got, expected, strict=True):
        for key, value in theirs.items():
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (mine["step"], key)
    ours = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    theirs = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-9, err_msg=key)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_end_to_end(tmp_path: Path, objective: str) -> None:
    unpaired = {"data": {"unpaired": True}} if OBJECTIVES[objective].unpaired else {}  # KTO: pairs split in two
    config = quick_config(tmp_path, objective={"name": objective}, train={"max_steps": 8, "eval_every": 1}, **unpaired)
    result = run(config, console=quiet())
    evals = [e for e in result.events if e["type"] == "eval"]
    first, last = evals[0], evals[-1]
    if objective == "sft":
        assert last["eval_loss"] < first["eval_loss"]
    else:
        assert last["eval_rewards/margins"] > first["eval_rewards/margins"]
    if objective in ("dpo", "dpo_norm", "ipo", "hinge"):  # their rewards start at 0, so any learning shows here
        assert last["eval_rewards/accuracies"] >= 0.5
    assert all(np.isfinite(e["loss"]) for e in result.events if e["type"] == "train")
    references = [e for e in result.events if e["type"] == "reference"]
    assert bool(references) == (not OBJECTIVES[objective].is_reference_free)  # reference-free ones need none
    card = (result.adapter_dir / "README.md").read_text()
    assert f"Objective: `{objective}`" in card and "rewards/accuracies" in card


def test_run_directory_layout_and_metrics_file(tmp_path: Path) -> None:
    result = run(
        quick_config(tmp_path, train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 1}), console=quiet()
    )
    names = {p.name for p in result.run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "adapter", "reference", "run.json"} <= names
    assert [p.name for p in (result.run_dir / "checkpoints").iterdir()] == ["step-00000004"]  # keep 1
    events = read_metrics(result.run_dir / "metrics.jsonl")
    assert [e["type"] for e in events][:4] == ["info", "reference", "reference", "start"]  # info: the padding
    train_events = [e for e in events if e["type"] == "train"]
    assert [e["step"] for e in train_events] == [1, 2, 3, 4]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "margins",
    ):
        assert key in train_events[-1]
    assert len(train_events[-1]["margins"]) == 4  # per-pair margins of the batch
    assert events[-1]["type"] == "end" and events[-1]["adapter"] == str(result.adapter_dir)


def test_cli_overrides_and_errors(tmp_path: Path, capsys) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text(quick_config(tmp_path, train={"max_steps": 1}).to_yaml())
    assert main(["--config", str(config_file), "objective.beta=0.2"]) == 0
    assert "done: the adapter is in" in capsys.readouterr().out
    assert main(["--config", str(config_file), "objective.bta=0.2"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'objective.bta' (did you mean 'objective.beta'?)" in err and "Traceback" not in err
    assert main(["--config", str(config_file), "train.lr=-1"]) == 2
    assert "train.lr must be > 0, got -1.0" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_the_demo_from_the_readme_command(tmp_path: Path) -> None:
    """`python -m core.run` with no arguments: trains, says where the adapter is, shows the preference learned."""
    env = {**os.environ, "DUET_CACHE_DIR": str(tmp_path / "cache")}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "core.run", f"train.output_dir={tmp_path / 'runs'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    adapter = re.search(r"done: the adapter is in (\S+)", out)
    assert adapter and (Path(adapter.group(1)) / "adapter_model.safetensors").is_file()
    accuracy = float(re.search(r"held-out reward accuracy ([\d.]+)", out).group(1))
    before, after = (int(x) for x in re.search(r"(\d+)% before → (\d+)% after", out).groups())
    assert accuracy >= 0.9, out
    assert after - before >= 50, out  # concise replies, the preferred behaviour, measured on held-out prompts
    assert seconds < 180, f"the demo took {seconds:.0f}s"
    summary = json.loads((Path(adapter.group(1)).parent / "run.json").read_text())
    assert summary["run_id"]


def test_lora_on_the_last_blocks_only(tmp_path: Path) -> None:
    result = run(quick_config(tmp_path, lora={"layers": 2}, train={"max_steps": 1}), console=quiet())
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    layers = {int(re.search(r"layers\.(\d+)\.", k).group(1)) for k in weights}
    assert layers == {2, 3} and len(weights) == 2 * 7 * 2


def test_resume_refuses_changed_data_and_finished_runs(tmp_path: Path) -> None:
    control = RunControl()
    config = quick_config(tmp_path, train={"max_steps": 4})
    first = run(
        config,
        console=quiet(),
        control=control,
        callback=lambda e: control.request_stop() if e["type"] == "train" and e["step"] == 2 else None,
    )
    data = Path(config.data.train)
    original = data.read_text()
    data.write_text(original.replace("Name a", "Name one", 1))
    from core.rundir import RunDirError

    with pytest.raises(RunDirError, match=r"the (train|eval) data differ from those the run started with"):
        run(resume=first.run_dir, console=quiet())
    data.write_text(original)
    finished = run(resume=first.run_dir, console=quiet())
    assert finished.state.step == 4
    with pytest.raises(RunDirError, match=r"finished all 4 steps; .* resume with train\.max_steps above 4"):
        run(resume=first.run_dir, console=quiet())
    longer = run(resume=first.run_dir, overrides=["train.max_steps=5"], console=quiet())
    assert longer.state.step == 5
    with pytest.raises(Exception, match=r"objective\.beta: cannot change when resuming"):
        run(resume=first.run_dir, overrides=["objective.beta=0.3"], console=quiet())


class LateStop(RunControl):
    """A stop that lands just after step 2's save decision was taken (after its last look at the stop flag):
    the window a signal can hit between two steps."""

    steps_seen = 0
    armed = False

    def take_save_request(self) -> bool:
        self.armed = self.steps_seen == 2 and not super().stop_requested
        return super().take_save_request()

    @property
    def stop_requested(self) -> bool:
        if self.armed:  # the save decision reads "no stop"; the signal comes right after
            self.armed = False
            self.request_stop("late signal")
            return False
        return super().stop_requested


def test_a_stop_after_the_save_decision_still_saves_that_step(tmp_path: Path) -> None:
    control = LateStop()

    def count(event: dict) -> None:
        if event["type"] == "train":
            control.steps_seen = event["step"]

    result = run(quick_config(tmp_path, train={"max_steps": 6}), console=quiet(), control=control, callback=count)
    assert result.stopped and result.state.step == 2
    assert [p.name for p in (result.run_dir / "checkpoints").glob("step-*")] == ["step-00000002"]


def test_the_saved_config_uses_absolute_paths(tmp_path: Path, monkeypatch) -> None:
    config = quick_config(tmp_path, train={"max_steps": 1})
    monkeypatch.chdir(tmp_path)
    config.data.train = "prefs.jsonl"  # relative to the working directory
    config.train.output_dir = "runs"
    result = run(config, console=quiet())
    saved = (result.run_dir / "config.yaml").read_text()
    assert f"train: {tmp_path / 'prefs.jsonl'}" in saved and str(result.run_dir).startswith(str(tmp_path))


def test_a_damaged_reference_cache_entry_is_recomputed(tmp_path: Path) -> None:
    config = quick_config(tmp_path, train={"max_steps": 1})
    run(config, console=quiet())
    for entry in (tmp_path / "cache" / "reference").glob("*.safetensors"):
        entry.write_bytes(b"garbage")
    again = run(config, console=quiet())
    assert [e["cache_hit"] for e in again.events if e["type"] == "reference"] == [False, False]


def test_tokenized_pairs_are_cached_and_reused(tmp_path: Path) -> None:
    config = quick_config(tmp_path, train={"max_steps": 1})
    first = run(config, console=quiet())
    second = run(config, console=quiet())
    said = [e["message"] for e in second.events if e["type"] == "info"]
    assert any("tokenized pairs: reused from the cache" in m for m in said)
    assert not any("tokenized pairs" in e.get("message", "") for e in first.events)
    runs = sorted((tmp_path / "runs").iterdir())
    fingerprints = [json.loads((r / "run.json").read_text())["data_fingerprints"] for r in runs]
    assert fingerprints[0] == fingerprints[1]  # the very same tokens
    other = run(quick_config(tmp_path, data={"max_length": 100}, train={"max_steps": 1}), console=quiet())
    assert not any("tokenized pairs" in e.get("message", "") for e in other.events)  # other settings: no hit


def test_a_run_reports_its_padding_with_and_without_length_grouping(tmp_path: Path) -> None:
    result = run(quick_config(tmp_path, train={"max_steps": 1}), console=quiet())
    lines = [e["message"] for e in result.events if e["type"] == "info" and e["message"].startswith("padding:")]
    assert len(lines) == 1
    grouped, plain = (float(x) for x in re.findall(r"([\d.]+)%", lines[0]))
    assert 0 <= grouped < plain  # the demo's lengths vary: grouping pads less


def test_held_out_prompts_are_answered_before_and_after_training(tmp_path: Path) -> None:
    config = quick_config(tmp_path, train={"max_steps": 4, "sample_replies": 3, "sample_max_new_tokens": 12})
    result = run(config, console=quiet())
    samples = [e for e in result.events if isinstance(e, SampleReplies)]
    assert len(samples) == 1 and len(samples[0].rows) == 3
    for row in samples[0].rows:
        assert set(row) == {"prompt", "before", "after"} and row["prompt"] and row["before"] and row["after"]
        assert row["prompt"] in samples[0].message
    assert len({row["prompt"] for row in samples[0].rows}) == 3  # distinct prompts
    logged = [e for e in read_metrics(result.run_dir / "metrics.jsonl") if e.type == "samples"]
    assert logged == samples
