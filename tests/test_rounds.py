"""Iterative rounds, headless (sample → a rule judge → DPO → held-out judging), on the demo model: the judged
behaviour rises round over round, and a kill in any phase resumes to the very pairs and adapter of an
uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from core.events import RoundReport, TrainStep
from core.metrics import read_metrics
from models.tiny_chat import unseen_prompts
from tests.faults.support import duet
from tests.helpers import DEMO_MODEL, write_demo_subset

pytestmark = pytest.mark.slow

SCORE_RULE = '''
def score(prompt, answer):
    """The demo's stated preference: a reply of one to four words."""
    return 1.0 if 0 < len(answer.split()) <= 4 else 0.0
'''


def rounds_config(folder: Path, *, prompts: int, held_out: int, **rounds: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "score.py").write_text(SCORE_RULE)
    (folder / "held_out.txt").write_text("\n".join(unseen_prompts()[:held_out]) + "\n")
    data = write_demo_subset(folder / "prefs.jsonl", count=prompts)
    config = {
        "model": {"path": str(DEMO_MODEL), "backend": "torch", "device": "cpu"},
        "data": {"train": str(data), "max_length": 128, "max_prompt_length": 64},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.1},
        "objective": {"name": "dpo", "nll_weight": 1.0},
        "train": {
            "batch_size": 8,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "save_every": 2,
            "run_name": "run",
            "output_dir": str(folder / "runs"),
            "cache_dir": str(folder / "cache"),
        },
        "sampling": {"temperature": 1.0, "max_new_tokens": 24, "seed": 3},
        "judge": {"kind": "rule", "rule": str(folder / "score.py")},
        "rounds": {"eval_prompts": str(folder / "held_out.txt"), **rounds},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_three_rounds_raise_the_judged_rate_on_held_out_prompts(tmp_path: Path) -> None:
    """The shipped recipe, models/demo/rounds.yaml: 3 rounds judged by models/demo/concise.py."""
    output = [f"train.output_dir={tmp_path / 'runs'}", f"train.cache_dir={tmp_path / 'cache'}", "train.run_name=run"]
    done = duet("--config", "models/demo/rounds.yaml", *output, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "run"
    reports = [json.loads((run / "rounds" / f"round-{n}" / "eval.json").read_text()) for n in (1, 2, 3)]
    base = reports[0]["mean_score_base"]
    rates = [r["mean_score"] for r in reports]
    print(f"concise share on 48 held-out prompts × 4 samples: base {base:.3f}, rounds {rates}")
    print("win rate over the base:", [r["vs_base"]["win_rate"] for r in reports])
    assert rates[0] < rates[1] < rates[2], rates
    assert rates[2] > base + 0.1
    assert reports[2]["vs_base"]["win_rate"] > 0.55
    # the top-level log: a round report per phase and the steps of every round on one axis
    events = read_metrics(run / "metrics.jsonl")
    steps = [e.step for e in events if isinstance(e, TrainStep)]
    assert steps == list(range(1, 91))
    done_reports = [e for e in events if isinstance(e, RoundReport) and e.phase == "done"]
    assert [e.mean_score for e in done_reports] == rates
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    pairs = [json.loads(line) for line in (run / "rounds" / "round-2" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 64 and all(len(p["duet"]["seeds"]) == 4 for p in pairs)


def _results(run: Path) -> dict[str, Any]:
    """Everything a rounds run produced that must not depend on whether it was interrupted."""
    out: dict[str, Any] = {}
    folder = str(run.parent.parent)  # the test's own folder: paths inside differ between the two runs

    def read(path: Path) -> str:
        return path.read_text().replace(folder, "<test>")

    for path in sorted((run / "rounds").rglob("*.jsonl")):
        if "train" in path.parts:
            continue
        rows = [json.loads(line) for line in read(path).splitlines()]
        for row in rows:
            row.get("duet", {}).pop("time", None)
        out[str(path.relative_to(run))] = rows
    for path in sorted((run / "rounds").glob("round-*/eval.json")):
        out[str(path.relative_to(run))] = json.loads(read(path))
    out["adapter"] = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("whole")
    config = rounds_config(
        folder, prompts=48, held_out=4, count=2, steps=4, samples=2, prompts_per_round=6, eval_samples=2
    )
    done = duet("--config", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    return _results(folder / "runs" / "run")


@pytest.mark.parametrize(
    "fault",
    [
        "collect.generate:3",  # round 1: the third prompt's answers made, not yet judged
        "collect.write:2",  # half-way through writing a judgement
        "collect.written:9",  # right after a judgement was synced, round 2
        "step.updated:3",  # round 1's training, after its step-2 checkpoint
        "rounds.trained:1",  # round 1 trained, its held-out answers not begun
        "rounds.eval_answer:3",  # in the middle of round 1's held-out answers
    ],
)
def test_a_kill_in_any_phase_resumes_to_the_same_pairs_and_adapter(
    tmp_path: Path, fault: str, uninterrupted: dict[str, Any]
) -> None:
    config = rounds_config(
        tmp_path, prompts=48, held_out=4, count=2, steps=4, samples=2, prompts_per_round=6, eval_samples=2
    )
    killed = duet("--config", str(config), fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "runs" / "run"
    for pairs in run.glob("rounds/round-*/pairs.jsonl"):  # the file parses at every point of the kill
        for line in pairs.read_bytes().splitlines(keepends=True):
            assert not line.endswith(b"\n") or json.loads(line)
    resumed = duet("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = _results(run)
    assert results.keys() == uninterrupted.keys()
    for key, expected in uninterrupted.items():
        if key == "adapter":
            for name, array in expected.items():
                np.testing.assert_allclose(results[key][name], array, rtol=0, atol=1e-6, err_msg=name)
        else:
            assert results[key] == expected, key
    steps = [e.step for e in read_metrics(run / "metrics.jsonl") if isinstance(e, TrainStep)]
    assert steps == list(range(1, 9))  # a resumed round's steps are not logged twice
