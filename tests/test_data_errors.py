"""A corpus of malformed preference data: each case gets its own clear error naming file, line and field."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from core.data import load_preferences
from core.errors import DataError

GOOD_EXPLICIT = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Bye."}
GOOD_IMPLICIT = {
    "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
    "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Bye."}],
}
GOOD_SHAREGPT = {
    "conversations": [{"from": "human", "value": "Hi?"}],
    "chosen": {"from": "gpt", "value": "Hello!"},
    "rejected": {"from": "gpt", "value": "Bye."},
}


def lines(*rows: object) -> bytes:
    return b"\n".join(row if isinstance(row, bytes) else json.dumps(row).encode() for row in rows) + b"\n"


def implicit(chosen_turns, rejected_turns):
    return {
        "chosen": [{"role": r, "content": c} for r, c in chosen_turns],
        "rejected": [{"role": r, "content": c} for r, c in rejected_turns],
    }


# name: (file name, file bytes, regex the message must match). {f} stands for the file's path.
CASES = {
    "invalid JSON line": (
        "d.jsonl",
        lines(GOOD_EXPLICIT, b'{"prompt": "x", "chosen": '),
        r"{f}:2: invalid JSON: Expecting value at column \d+",
    ),
    "missing field": (
        "d.jsonl",
        lines(GOOD_EXPLICIT, {"prompt": "x", "rejected": "y"}),
        r"{f}:2: missing field 'chosen'",
    ),
    "empty field": (
        "d.jsonl",
        lines(GOOD_EXPLICIT, {"prompt": "x", "chosen": "", "rejected": "y"}),
        r"{f}:2: field 'chosen' is empty",
    ),
    "whitespace-only field": (
        "d.jsonl",
        lines(GOOD_EXPLICIT, {"prompt": "  \n", "chosen": "a", "rejected": "b"}),
        r"{f}:2: field 'prompt' is empty",
    ),
    "null field": (
        "d.jsonl",
        lines(GOOD_EXPLICIT, {"prompt": "x", "chosen": None, "rejected": "b"}),
        r"{f}:2: missing field 'chosen'",
    ),
    "wrong type": (
        "d.jsonl",
        lines(GOOD_EXPLICIT, {"prompt": "x", "chosen": 5, "rejected": "b"}),
        r"{f}:2: field 'chosen': expected a string or an assistant message, got int",
    ),
    "identical replies": (
        "d.jsonl",
        lines(GOOD_EXPLICIT, {"prompt": "x", "chosen": "same", "rejected": "same"}),
        r"{f}:2: 'chosen' and 'rejected' are identical",
    ),
    "no shared prefix": (
        "d.jsonl",
        lines(GOOD_IMPLICIT, implicit([("user", "A?"), ("assistant", "1")], [("user", "B?"), ("assistant", "2")])),
        r"{f}:2: 'chosen' and 'rejected' share no prompt: they differ at chosen\[0\] / rejected\[0\], before the final",
    ),
    "conversation not ending with the assistant": (
        "d.jsonl",
        lines(
            GOOD_IMPLICIT,
            implicit([("user", "A?"), ("assistant", "1"), ("user", "more")], [("user", "A?"), ("assistant", "2")]),
        ),
        r"{f}:2: field 'chosen\[2\]': the conversation must end with the assistant's reply, not a 'user' turn",
    ),
    "unknown role": (
        "d.jsonl",
        lines(
            GOOD_IMPLICIT, implicit([("narrator", "A?"), ("assistant", "1")], [("narrator", "A?"), ("assistant", "2")])
        ),
        r"{f}:2: field 'chosen\[0\]\.role': unknown role 'narrator'",
    ),
    "message without content": (
        "d.jsonl",
        lines(GOOD_IMPLICIT, {"chosen": [{"role": "user"}], "rejected": []}),
        r"{f}:2: field 'chosen\[0\]': the message has no 'content'",
    ),
    "not an object": (
        "d.jsonl",
        lines(GOOD_EXPLICIT, ["prompt", "chosen"]),
        r"{f}:2: expected an object with the explicit fields, got list",
    ),
    "non-UTF-8 bytes in JSON lines": (
        "d.jsonl",
        lines(GOOD_EXPLICIT, b'{"prompt": "caf\xe9", "chosen": "a"}'),
        r"{f}:2: the bytes are not valid UTF-8 \(byte 0xe9 at column 16\)",
    ),
    "non-UTF-8 bytes in JSON": (
        "d.json",
        b'[\n  {"prompt": "ok"},\n  {"prompt": "caf\xe9"}\n]',
        r"{f}:3: the bytes are not valid UTF-8 \(byte 0xe9 at column 18\)",
    ),
    "invalid JSON document": (
        "d.json",
        b'[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": }\n]',
        r"{f}:3: invalid JSON: Expecting value at column 14",
    ),
    "unclosed JSON array": (
        "d.json",
        b'[\n  {"prompt": "a", "chosen": "b", "rejected": "c"}\n',
        r"{f}:\d+: invalid JSON: the array is not closed",
    ),
    "empty file": ("d.jsonl", b"\n\n", r"{f}: the file is empty"),
    "empty array": ("d.json", b"[]", r"{f}: no rows found"),
    "unknown format": (
        "d.jsonl",
        lines({"question": "q", "answer": "a"}),
        r"(?s){f}: cannot tell which preference format this is\. Keys seen in the first rows: "
        r"answer, question\..*explicit: \{prompt: str.*data\.columns",
    ),
    "unsupported file type": ("d.csv", b"prompt,chosen,rejected\n", r"{f}: unsupported file type '\.csv'"),
    "corrupt gzip": ("d.jsonl.gz", b"not gzip at all", r"{f}: the file is not a valid gzip file"),
    "reply from the user": (
        "d.jsonl",
        lines(GOOD_SHAREGPT, {**GOOD_SHAREGPT, "chosen": {"from": "human", "value": "x"}}),
        r"{f}:2: field 'chosen': the reply must come from the assistant, not 'user'",
    ),
    "HH transcript without turns": (
        "d.jsonl",
        lines(
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            {"chosen": "just text", "rejected": "other text"},
        ),
        r"{f}:2: field 'chosen': expected an HH-RLHF transcript",
    ),
    "several replies": (
        "d.jsonl",
        lines(
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [{"role": "assistant", "content": "c"}],
            }
        ),
        r"{f}:1: field 'chosen': expected one assistant message, got 2 messages",
    ),
    "image content": (
        "d.jsonl",
        lines(
            {
                "prompt": [{"role": "user", "content": [{"type": "image", "url": "x"}]}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            }
        ),
        r"{f}:1: field 'prompt\[0\]\.content\[0\]': a part of type 'image' is not text",
    ),
    "system twice": (
        "d.jsonl",
        lines(
            {
                "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                "system": "t",
                "chosen": "a",
                "rejected": "b",
            }
        ),
        r"{f}:1: both a 'system' field and a system turn in the prompt",
    ),
    "prompt ending with the assistant": (
        "d.jsonl",
        lines(
            {
                "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
                "chosen": "a",
                "rejected": "b",
            }
        ),
        r"{f}:1: field 'prompt': the prompt ends with an assistant turn",
    ),
    "score not a number": (
        "d.jsonl",
        lines(
            {
                **implicit([("user", "q"), ("assistant", "a")], [("user", "q"), ("assistant", "b")]),
                "prompt": "q",
                "score_chosen": "high",
            }
        ),
        r"{f}:1: field 'score_chosen': expected a number, got str",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_gets_a_specific_error(tmp_path: Path, case: str) -> None:
    name, content, pattern = CASES[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        load_preferences(path)
    assert re.search(pattern.replace("{f}", re.escape(str(path))), str(error.value)), str(error.value)


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 15


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere\.jsonl: no such file or folder"):
        load_preferences(tmp_path / "nowhere.jsonl")


def test_errors_use_the_users_column_names(tmp_path: Path) -> None:
    path = tmp_path / "se.jsonl"
    path.write_bytes(
        lines(
            {"question": "q", "response_j": "a", "response_k": "b"},
            {"question": "q", "response_j": "", "response_k": "b"},
        )
    )
    with pytest.raises(
        DataError,
        match=r"se\.jsonl:2: field 'response_j' is empty \(columns mapped: "
        r"response_j → chosen",
    ):
        load_preferences(path, columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"})


def test_skip_invalid_counts_and_lists_what_it_skipped(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl.gz"
    path.write_bytes(
        gzip.compress(
            lines(
                GOOD_EXPLICIT,
                b"{broken",
                {"prompt": "x", "chosen": "", "rejected": "y"},
                GOOD_EXPLICIT,
                {"prompt": "x", "chosen": "same", "rejected": "same"},
                {"prompt": "x", "rejected": "y"},
                {"prompt": "z", "chosen": "a", "rejected": "b"},
            )
        )
    )
    pairs, report = load_preferences(path, skip_invalid=True)
    assert len(pairs) == 3 and report.rows == 7
    assert report.skipped == {"invalid JSON": 1, "empty field": 1, "identical replies": 1, "missing field": 1}
    assert report.duplicates == 1
    assert report.skipped_examples[0].startswith(f"{path}:2: invalid JSON")
    assert any("skipped 4 invalid rows" in line for line in report.summary_lines())


def test_skip_invalid_with_nothing_left_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        lines({"prompt": "x", "chosen": "s", "rejected": "s"}, {"prompt": "x", "chosen": "", "rejected": "y"})
    )
    with pytest.raises(DataError, match=r"none of its 2 rows is a usable pair \(1 identical replies, 1 empty field\)"):
        load_preferences(path, skip_invalid=True)


def test_forced_format_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(lines(GOOD_EXPLICIT))
    with pytest.raises(DataError, match="unknown data format 'sharegtp'"):
        load_preferences(path, format="sharegtp")


def test_more_bad_values(tmp_path: Path) -> None:
    cases = {
        "surrogate.jsonl": (
            b'{"prompt": "bad \\ud800 text", "chosen": "a", "rejected": "b"}\n',
            r":1: field 'prompt': contains a character that is not valid Unicode \('\\ud800'",
        ),
        "nan.jsonl": (
            lines(
                {
                    "prompt": "q",
                    "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
                    "score_chosen": float("nan"),
                }
            ),
            r":1: field 'score_chosen': expected a finite number",
        ),
        "tool.jsonl": (
            lines({"prompt": [{"role": "tool", "content": "42"}], "chosen": "a", "rejected": "b"}),
            r":1: field 'prompt': the prompt has no user turn",
        ),
    }
    for name, (content, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=re.escape(str(path)) + pattern):
            load_preferences(path)


def test_json_documents_of_every_shape(tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    one.write_text(json.dumps(GOOD_IMPLICIT, indent=2))  # a single row: not mistaken for a {"data": [...]} wrapper
    pairs, report = load_preferences(one)
    assert report.format == "implicit" and len(pairs) == 1
    stream = tmp_path / "stream.json"
    stream.write_text("\n".join(json.dumps(GOOD_EXPLICIT, indent=2) for _ in range(3)))  # pretty-printed, back to back
    pairs, _ = load_preferences(stream, skip_invalid=True)
    assert [p.location.line for p in pairs] == [1, 6, 11]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(GOOD_EXPLICIT, indent=2) + '\n{\n  "prompt": }\n')
    with pytest.raises(DataError, match=re.escape(str(broken)) + r":7: invalid JSON"):
        load_preferences(broken)


def _error(path: Path, **options) -> str:
    with pytest.raises(DataError) as error:
        load_preferences(path, **options)
    return str(error.value)


def test_json_errors_say_at_once(tmp_path: Path) -> None:
    """json's own message "Unterminated string starting at" is not followed by a second "at"."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(lines(GOOD_EXPLICIT, b'{"prompt": "x", "chosen": "no end'))
    assert f"{path}:2: invalid JSON: Unterminated string starting at column 27." in _error(path)
    document = tmp_path / "d.json"
    document.write_bytes(b'[\n  {"prompt": "no end')
    assert f"{document}:2: invalid JSON: Unterminated string starting at column 14." in _error(document)
    document.write_bytes(b'[\n  {"prompt": "line\nbreak"}]')
    assert f"{document}:2: invalid JSON: Invalid control character at column 19." in _error(document)
    _, report = load_preferences(path, skip_invalid=True)
    assert report.skipped_examples == [f"{path}:2: invalid JSON: Unterminated string starting at column 27"]


def test_strict_mode_says_how_many_rows_are_bad_and_how_to_list_them(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        lines(
            GOOD_EXPLICIT,
            {"prompt": "x", "chosen": "", "rejected": "y"},
            GOOD_EXPLICIT,
            b"{broken",
            {"prompt": "x", "chosen": "same", "rejected": "same"},
        )
    )
    message = _error(path)
    assert message.startswith(f"{path}:2: field 'chosen' is empty. 2 more of the 5 rows are bad too (3 in all); ")
    assert f"list them with `duet inspect {path} --model MODEL --skip-invalid`" in message
    assert "pass --skip-invalid (data.skip_invalid: true)" in message
    one_bad = tmp_path / "one.jsonl"
    one_bad.write_bytes(lines(GOOD_EXPLICIT, {"prompt": "x", "chosen": "", "rejected": "y"}))
    message = _error(one_bad)
    assert "Fix the row, or pass --skip-invalid" in message and "more of the" not in message


def test_messages_in_a_row_are_named_by_their_index_in_every_error(tmp_path: Path) -> None:
    """One convention: chosen[0] is the first message (as in the JSON), never "message 1"."""
    for name, (file_name, content, _) in CASES.items():
        path = tmp_path / name.replace(" ", "-") / file_name
        path.parent.mkdir()
        path.write_bytes(content)
        message = _error(path)
        assert not re.search(r"\b(message|turn|part) \d", message), (name, message)
