"""Preference data: every fixture file and every common format loads into the same normalized records."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from core.data import Message, load_preferences

FIXTURE_EXPECTATIONS = {
    # file: (format, rows, pairs, multi-turn, with system, ties)
    "llamafactory_dpo_en_demo.json": ("sharegpt", 300, 300, 106, 80, 0),
    "firefly_ultrafeedback_binarized_sample.jsonl": ("ultrafeedback", 16, 16, 0, 0, 4),
    "llamafactory_v1_dpo_demo.jsonl": ("llamafactory_v1", 10, 10, 0, 10, 0),
    "torchtune_hh_rlhf_tiny.json": ("implicit", 1, 1, 0, 0, 0),
}


@pytest.mark.parametrize("name", sorted(FIXTURE_EXPECTATIONS))
def test_fixture_files_load_with_the_right_format(fixture_data: Path, name: str) -> None:
    fmt, rows, pairs_expected, multi_turn, with_system, ties = FIXTURE_EXPECTATIONS[name]
    pairs, report = load_preferences(fixture_data / name)
    assert (report.format, report.rows, report.pairs) == (fmt, rows, pairs_expected)
    assert len(pairs) == pairs_expected
    assert (report.multi_turn, report.with_system, report.ties) == (multi_turn, with_system, ties)
    for pair in pairs:
        assert pair.prompt and pair.prompt[-1].role == "user"
        assert pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected
        assert all(m.role != "system" for m in pair.prompt)


def test_sharegpt_fixture_keeps_every_turn_and_the_system_message(fixture_data: Path) -> None:
    rows = json.loads((fixture_data / "llamafactory_dpo_en_demo.json").read_text())
    pairs, _ = load_preferences(fixture_data / "llamafactory_dpo_en_demo.json")
    for row, pair in zip(rows, pairs, strict=True):
        turns = [t for t in row["conversations"] if t["from"] != "system"]
        assert [m.content for m in pair.prompt] == [t["value"] for t in turns]
        assert [m.role for m in pair.prompt] == [{"human": "user", "gpt": "assistant"}[t["from"]] for t in turns]
        system = [t["value"] for t in row["conversations"] if t["from"] == "system"]
        assert pair.system == (system[0] if system else None)
        assert pair.chosen == row["chosen"]["value"] and pair.rejected == row["rejected"]["value"]


def test_ultrafeedback_and_v1_fixtures_split_prompt_from_replies(fixture_data: Path) -> None:
    lines = (fixture_data / "firefly_ultrafeedback_binarized_sample.jsonl").read_text().splitlines()
    pairs, _ = load_preferences(fixture_data / "firefly_ultrafeedback_binarized_sample.jsonl")
    for line, pair in zip(lines, pairs, strict=True):
        row = json.loads(line)
        assert pair.prompt == (Message("user", row["prompt"]),)
        assert pair.chosen == row["chosen"][-1]["content"]
        assert (pair.score_chosen, pair.score_rejected) == (row["score_chosen"], row["score_rejected"])
    pairs, _ = load_preferences(fixture_data / "llamafactory_v1_dpo_demo.jsonl")
    first = json.loads((fixture_data / "llamafactory_v1_dpo_demo.jsonl").read_text().splitlines()[0])
    assert pairs[0].system == first["chosen_messages"][0]["content"][0]["value"]
    assert pairs[0].rejected == first["rejected_messages"][-1]["content"][0]["value"]


# One conversation (system, two user turns, one earlier assistant turn) in every format.
SYSTEM = "Be brief."
TURNS = [("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?")]
CHOSEN, REJECTED = "6.", "It is 7, probably."


def _messages(turns, key_role="role", key_content="content"):
    return [{key_role: role, key_content: content} for role, content in turns]


SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}
FORMAT_ROWS = {
    "conversational": {
        "prompt": _messages([("system", SYSTEM), *TURNS]),
        "chosen": [{"role": "assistant", "content": CHOSEN}],
        "rejected": [{"role": "assistant", "content": REJECTED}],
    },
    "implicit": {
        "chosen": _messages([("system", SYSTEM), *TURNS, ("assistant", CHOSEN)]),
        "rejected": _messages([("system", SYSTEM), *TURNS, ("assistant", REJECTED)]),
    },
    "ultrafeedback": {
        "prompt": TURNS[-1][1],
        "prompt_id": "x",
        "chosen": _messages([("system", SYSTEM), *TURNS, ("assistant", CHOSEN)]),
        "rejected": _messages([("system", SYSTEM), *TURNS, ("assistant", REJECTED)]),
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    },
    "sharegpt": {
        "conversations": [{"from": SHAREGPT_ROLES[r], "value": c} for r, c in [("system", SYSTEM), *TURNS]],
        "chosen": {"from": "gpt", "value": CHOSEN},
        "rejected": {"from": "gpt", "value": REJECTED},
    },
    "llamafactory_v1": {
        "chosen_messages": [
            {"role": r, "content": [{"type": "text", "value": c}], "loss_weight": 0.0}
            for r, c in [("system", SYSTEM), *TURNS, ("assistant", CHOSEN)]
        ],
        "rejected_messages": [
            {"role": r, "content": [{"type": "text", "value": c}], "loss_weight": 0.0}
            for r, c in [("system", SYSTEM), *TURNS, ("assistant", REJECTED)]
        ],
    },
    "hh_rlhf": {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: It is 7, probably.",
    },
    "alpaca": {
        "instruction": "And 3+3?",
        "input": "",
        "history": [["What is 2+2?", "4."]],
        "system": SYSTEM,
        "chosen": CHOSEN,
        "rejected": REJECTED,
    },
}
EXPECTED_PROMPT = tuple(Message(r, c) for r, c in TURNS)


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows in the file type ``path``'s suffixes name (.jsonl, .json, .parquet, optionally .gz)."""
    suffixes = path.suffixes
    if suffixes[-1] == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    jsonl = ".jsonl" in suffixes
    text = "\n".join(json.dumps(row) for row in rows) + "\n" if jsonl else json.dumps(rows, indent=2)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if suffixes[-1] == ".gz" else data)
    return path


@pytest.mark.parametrize("fmt", sorted(FORMAT_ROWS))
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet"])
def test_every_format_in_every_file_type_gives_the_same_pair(tmp_path: Path, fmt: str, suffix: str) -> None:
    rows = [FORMAT_ROWS[fmt], FORMAT_ROWS[fmt]]
    pairs, report = load_preferences(write_rows(tmp_path / f"data{suffix}", rows))
    assert report.format == fmt
    assert report.duplicates == 1
    pair = pairs[0]
    if fmt == "hh_rlhf":  # HH transcripts have no system turn
        assert pair.system is None
    else:
        assert pair.system == SYSTEM
    assert pair.prompt == EXPECTED_PROMPT
    assert (pair.chosen, pair.rejected) == (CHOSEN, REJECTED)
    assert pair.location is not None and pair.location.source.endswith(suffix)


def test_explicit_string_format(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "d.jsonl", [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "system": "Be nice."}]
    )
    pairs, report = load_preferences(path)
    assert report.format == "explicit"
    assert pairs[0].conversation() == [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi?"}]


def test_columns_are_remappable(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "se.jsonl", [{"question": "Why?", "response_j": "Because.", "response_k": "No."}])
    pairs, report = load_preferences(
        path, columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    )
    assert report.format == "explicit"
    assert (pairs[0].prompt[0].content, pairs[0].chosen, pairs[0].rejected) == ("Why?", "Because.", "No.")


def test_json_rows_know_their_line_numbers(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.json", [FORMAT_ROWS["sharegpt"]] * 3)
    pairs, _ = load_preferences(path)
    text = path.read_text().splitlines()
    for pair in pairs:
        assert text[pair.location.line - 1].strip() == "{"
    assert len({p.location.line for p in pairs}) == 3


def test_json_wrapped_in_an_object_and_json_lines_named_json(tmp_path: Path) -> None:
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [FORMAT_ROWS["sharegpt"]] * 2}))
    assert load_preferences(wrapped)[1].pairs == 2
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(FORMAT_ROWS["implicit"]) for _ in range(3)))
    pairs, report = load_preferences(lines)
    assert report.pairs == 3 and pairs[2].location.line == 3


def test_local_dataset_folder_goes_through_datasets(tmp_path: Path) -> None:
    """The hub-id path (datasets.load_dataset) exercised offline: a folder of data files, and a saved dataset."""
    import datasets

    folder = tmp_path / "my_prefs"
    folder.mkdir()
    write_rows(folder / "train.jsonl", [FORMAT_ROWS["conversational"]] * 4)
    pairs, report = load_preferences(folder)
    assert report.format == "conversational" and report.pairs == 4
    assert str(pairs[0].location) == f"{folder} [train] row 1"

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}] * 2).save_to_disk(saved)
    assert load_preferences(saved)[1].pairs == 2


def test_multi_turn_prompts_keep_all_turns(tmp_path: Path) -> None:
    turns = [("user", f"q{i}") if i % 2 == 0 else ("assistant", f"a{i}") for i in range(9)]
    row = {"chosen": _messages([*turns, ("assistant", "good")]), "rejected": _messages([*turns, ("assistant", "bad")])}
    pairs, report = load_preferences(write_rows(tmp_path / "m.jsonl", [row]))
    assert [m.content for m in pairs[0].prompt] == [c for _, c in turns]
    assert report.multi_turn == 1
