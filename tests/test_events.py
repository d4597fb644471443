"""Typed events survive metrics.jsonl: every kind reads back as itself, unknown kinds and torn lines are
skipped, fields a newer writer added are kept."""

from __future__ import annotations

import json
from pathlib import Path

from core.events import (
    KINDS,
    CheckpointSaved,
    DemoReport,
    Evaluation,
    Failed,
    Finished,
    Info,
    Paused,
    Progress,
    ReferenceReady,
    Resumed,
    RoundReport,
    RunStarted,
    RunWarning,
    SampleReplies,
    Stopped,
    ThreadsChanged,
    TrainStep,
    event_from_json,
)
from core.metrics import MetricsLog, read_metrics

ONE_OF_EACH = [
    RunStarted(run_dir="runs/a", total_steps=40, backend="torch", objective="dpo", message="training"),
    ReferenceReady(split="train", cache_hit=True, key="ab12", message="reference: cache hit"),
    TrainStep(
        step=3,
        total_steps=40,
        epoch=0.2,
        metrics={"loss": 0.69, "rewards/margins": 0.01, "nll_loss": None},
        learning_rate=1e-3,
        grad_norm=None,
        tokens_per_second=900.0,
        eta=12.5,
        margins=[0.1, -0.2],
        memory={"peak_rss": 4e8},
    ),
    Evaluation(step=10, metrics={"loss": 0.66, "rewards/accuracies": 0.75}, margins=[0.3], pairs=8),
    CheckpointSaved(step=20, path="runs/a/checkpoints/step-00000020", message="saved"),
    Progress(phase="reference", label="reference", done=3, total=9, elapsed=1.5, eta=3.0, message="3/9"),
    RunWarning(step=5, message="skipped"),
    RunWarning(message="no step"),
    Info(message="padding: 3%"),
    ThreadsChanged(step=7, threads=1, message="after step 7: now 1 thread (auto: 2 cores, 1 busy)"),
    DemoReport(report={"samples": 6, "base_concise": 0.0}, message="demo"),
    SampleReplies(rows=[{"prompt": "p", "before": "b", "after": "a"}], message="replies"),
    RoundReport(
        round=2,
        rounds=3,
        phase="done",
        step_offset=20,
        pairs=30,
        ties=2,
        win_rate_vs_base=0.6,
        win_rate_vs_previous=0.55,
        mean_score=0.7,
        figures={"vs_base": {"wins": 10, "ties": 4, "losses": 6}},
        message="round 2/3",
    ),
    Paused(step=7, message="paused"),
    Resumed(step=7, message="resumed"),
    Stopped(step=20, reason="SIGTERM", message="stopped"),
    Finished(step=40, adapter="runs/a/adapter", final={"loss": 0.5}, message="done"),
    Failed(message="boom"),
]


def test_every_kind_reads_back_as_itself_through_metrics_jsonl(tmp_path: Path) -> None:
    assert {type(e) for e in ONE_OF_EACH} == set(KINDS.values())
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for event in ONE_OF_EACH:
        log(event)
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == ONE_OF_EACH


def test_the_file_keeps_trl_names_at_the_top_level() -> None:
    train = ONE_OF_EACH[2].to_json()
    assert train["type"] == "train" and train["loss"] == 0.69 and train["rewards/margins"] == 0.01
    assert "metrics" not in train and train["grad_norm"] is None  # a step's metric is written even when unset
    evaluation = ONE_OF_EACH[3].to_json()
    assert evaluation["eval_loss"] == 0.66 and evaluation["eval_margins"] == [0.3] and evaluation["eval_pairs"] == 8
    assert "step" not in RunWarning(message="x").to_json()  # an optional field left unset is left out
    assert ONE_OF_EACH[2]["rewards/margins"] == 0.01 and "loss" in ONE_OF_EACH[2]


def test_unknown_kinds_torn_lines_and_new_fields(tmp_path: Path) -> None:
    lines = [
        json.dumps({"type": "train", "step": 1, "total_steps": 2, "loss": 0.7, "future_field": [1]}),
        json.dumps({"type": "a-kind-from-a-newer-duet", "step": 1}),
        json.dumps({"type": "checkpoint", "path": "no step"}),  # lacks a field its kind requires
        json.dumps(["not", "an", "object"]),
        '{"type": "eval", "step": 2, "eval_lo',  # torn: killed mid-line
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines))
    events = read_metrics(path)
    assert len(events) == 1 and isinstance(events[0], TrainStep)
    assert events[0].metrics == {"loss": 0.7, "future_field": [1]}  # a train line's unknown numbers are metrics
    info = event_from_json({"type": "info", "message": "m", "demo": {"samples": 6}})
    assert isinstance(info, Info) and info.extra == {"demo": {"samples": 6}}
    assert info.to_json() == {"type": "info", "message": "m", "demo": {"samples": 6}}
