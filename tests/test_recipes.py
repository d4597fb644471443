"""The recipes under models/: every shipped config loads and validates, and the rule judges they name load and
judge as their docstrings say (the end-to-end runs: tests/test_rounds.py on the demo, docs/benchmarks.md and
the README on SmolLM2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import load_config
from core.judges import load_rule
from models.registry import RECOMMENDED

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.glob("models/*/*.yaml"))


def test_the_recipes_are_found() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in RECIPES}
    assert {"models/demo/run.yaml", "models/demo/rounds.yaml", "models/smollm2/run.yaml"} <= names
    assert "models/smollm2/rounds.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_each_recipe_validates_and_its_files_exist(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the recipes' paths are relative to the checkout's root, as their comments say
    config = load_config(path).validate()
    assert config.model.path == "demo" or config.model.path in RECOMMENDED, config.model.path
    files = (config.data.train, config.data.eval, config.judge.rule, config.rounds.prompts, config.rounds.eval_prompts)
    files += (config.evaluation.prompts, config.judge.template)
    for value in files:  # the recipes name files of the checkout (no hub ids): each must be there
        if value and value != "demo":
            assert (ROOT / value.split(":")[0]).is_file(), value
    if config.judge.kind == "rule":
        load_rule(str(ROOT / config.judge.rule))


def test_smollm2s_brief_rule() -> None:
    judge = load_rule(str(ROOT / "models/smollm2/brief.py"))
    cut = "Paris is the capital of France, and it has been for a very long time, since the"
    short = "Paris."
    longer = "The capital of France is Paris, a city on the Seine."
    assert judge.judge("q", cut, longer).winner == "b"  # a complete answer over one cut off
    assert judge.judge("q", longer, cut).winner == "a"
    assert judge.judge("q", longer, short).winner == "b"  # then the shorter
    assert (
        judge.judge(
            "q",
            "One two three four five six seven eight nine ten.",
            "One two three four five six seven eight nine ten eleven.",
        ).winner
        == "tie"
    )  # within a tenth of each other's length
    assert judge.judge("q", "", cut).winner == "b"  # an empty answer never wins
    assert judge.judge("q", "  ", "").winner == "tie"
