"""Unpaired data for KTO: the format (TRL's unpaired preference rows, text or messages, and the Collect
screen's thumbs rows), pairs split into rated examples on request, each example's mismatched reply, the
class-balance advice, and a clear message for each kind of bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from core.data import load_preferences
from core.data.unpaired import balance_advice, split_pairs, with_mismatched_replies
from core.errors import DataError
from core.run import run
from models.tiny_chat import preference_rows
from tests.helpers import quick_config


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def unpaired_rows(count: int = 32, seed: int = 0) -> list[dict]:
    """Rated replies from demo pairs: the concise reply desirable, the rambling one undesirable; half of them as
    text rows, half as conversational rows (the Collect screen's thumbs rows are conversational)."""
    rows = []
    for index, pair in enumerate(preference_rows(seed=seed, count=count // 2)):
        for reply, label in ((pair["chosen"], True), (pair["rejected"], False)):
            if index % 2:
                rows.append({"prompt": pair["prompt"], "completion": reply, "label": label})
            else:
                rows.append(
                    {
                        "prompt": [{"role": "user", "content": pair["prompt"]}],
                        "completion": [{"role": "assistant", "content": reply}],
                        "label": label,
                        "duet": {"mode": "thumbs", "verdict": "up" if label else "down"},
                    }
                )
    return rows


def test_unpaired_rows_load_as_rated_examples(tmp_path: Path) -> None:
    rows = unpaired_rows(8)
    skip = {"prompt": [{"role": "user", "content": "Skipped?"}], "duet": {"mode": "thumbs", "verdict": "skip"}}
    examples, report = load_preferences(write_rows(tmp_path / "thumbs.jsonl", [*rows, skip]))
    assert report.format == "unpaired" and report.unpreferred_judgements == 1  # the skip is a record only
    assert [e.label for e in examples] == [r["label"] for r in rows]
    assert [e.prompt[-1].content for e in examples[::2]] == [p["prompt"] for p in preference_rows(seed=0, count=4)]
    assert all(e.is_unpaired and e.rejected == "" for e in examples)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Hi", "completion": "Hello"}, "thumbs.jsonl:2: missing field 'label'"),
        ({"prompt": "Hi", "completion": "Hello", "label": "yes"}, "thumbs.jsonl:2: field 'label': expected true"),
        ({"prompt": "Hi", "completion": "Hello", "label": 1}, "got int 1"),
        ({"prompt": "Hi", "completion": "", "label": True}, "thumbs.jsonl:2: field 'completion'"),
        (
            {"prompt": "Hi", "completion": [{"role": "user", "content": "x"}], "label": True},
            "must come from the assistant",
        ),
    ],
)
def test_a_bad_unpaired_row_names_its_line_and_field(tmp_path: Path, row: dict, message: str) -> None:
    path = write_rows(tmp_path / "thumbs.jsonl", [{"prompt": "Ok", "completion": "Fine", "label": True}, row])
    with pytest.raises(DataError, match="Fix the row, or pass --skip-invalid") as error:
        load_preferences(path)
    assert message in str(error.value)


def test_pairs_split_into_rated_examples_each_with_a_reply_to_another_prompt(tmp_path: Path) -> None:
    pairs, _ = load_preferences(write_rows(tmp_path / "pairs.jsonl", preference_rows(seed=1, count=20)))
    examples = split_pairs(pairs)
    assert [e.label for e in examples] == [True, False] * 20
    assert [e.chosen for e in examples[::2]] == [p.chosen for p in pairs]
    assert [e.chosen for e in examples[1::2]] == [p.rejected for p in pairs]
    laid_out = with_mismatched_replies(examples, seed=3)
    assert laid_out == with_mismatched_replies(examples, seed=3) != with_mismatched_replies(examples, seed=4)
    replies = {e.chosen: e.prompt for e in examples}
    for example, original in zip(laid_out, examples, strict=True):
        assert (example.chosen, example.label, example.prompt) == (original.chosen, original.label, original.prompt)
        assert example.rejected != example.chosen and replies[example.rejected] != example.prompt


def test_the_class_balance_advice_follows_the_kto_paper() -> None:
    assert balance_advice(50, 50, 1.0, 1.0) is None
    assert balance_advice(40, 30, 1.0, 1.0) is None  # 1.33: the paper's upper bound
    advice = balance_advice(10, 90, 1.0, 1.0)
    # λ_D·n_D/(λ_U·n_U) in [1, 4/3]: λ_D in [9, 12] or λ_U in [0.08, 0.11]
    assert advice is not None and "[9.00, 12.00]" in advice and "[0.08, 0.11]" in advice
    assert balance_advice(10, 90, 9.5, 1.0) is None
    assert "all 12 examples are desirable" in balance_advice(12, 0, 1.0, 1.0)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.mark.parametrize(
    ("objective", "data", "message"),
    [
        ("kto", "pairs", "trains on unpaired examples (prompt, completion, label: true|false), and these rows are "),
        ("dpo", "unpaired", "its rows are unpaired examples (prompt, completion, label), which a pairwise objective"),
    ],
)
def test_data_of_the_wrong_kind_for_the_objective_is_refused(tmp_path: Path, objective, data, message) -> None:
    rows = preference_rows(seed=0, count=16) if data == "pairs" else unpaired_rows(16)
    path = write_rows(tmp_path / f"{data}.jsonl", rows)
    config = quick_config(tmp_path, objective={"name": objective}, data={"train": str(path)})
    with pytest.raises(DataError, match=r"data\.unpaired=true|objective\.name=kto") as error:
        run(config, console=quiet())
    assert message in str(error.value)


def test_kto_trains_on_a_thumbs_file_and_warns_about_one_class(tmp_path: Path) -> None:
    rows = unpaired_rows(32)
    path = write_rows(tmp_path / "thumbs.jsonl", rows)
    config = quick_config(tmp_path, objective={"name": "kto"}, data={"train": str(path)}, train={"max_steps": 3})
    result = run(config, console=quiet())
    assert result.state.step == 3 and not any(e["type"] == "warning" for e in result.events)
    start = next(e for e in result.events if e["type"] == "start")
    assert "28 examples" in start["message"]  # 32 less the 4 held out (data.eval_fraction 0.125)
    train = [e for e in result.events if e["type"] == "train"]
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= set(train[-1].to_json())

    only_up = write_rows(tmp_path / "up.jsonl", [r for r in rows if r["label"]])
    config = quick_config(tmp_path, objective={"name": "kto"}, data={"train": str(only_up)}, train={"max_steps": 1})
    warned = [e["message"] for e in run(config, console=quiet()).events if e["type"] == "warning"]
    assert any("all 16 examples are desirable" in w for w in warned)
