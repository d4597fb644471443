"""``duet inspect``: exit 0 with a report when the data is usable, 2 with a clear message when not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import main
from tests.conftest import TOKENIZERS


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_reports_format_counts_lengths_and_renders_a_pair(fixture_data: Path, capsys) -> None:
    code, out, _ = run_cli(
        capsys,
        "inspect",
        str(fixture_data / "llamafactory_dpo_en_demo.json"),
        "--model",
        str(TOKENIZERS / "qwen2.5-0.5b-instruct"),
        "--max-length",
        "512",
        "--max-prompt-length",
        "256",
        "--show",
        "1",
    )
    assert code == 0
    assert "format sharegpt, 300 rows → 300 pairs" in out
    assert "106 multi-turn, 80 with a system message, 5 duplicated pairs" in out
    for column in ("p50", "p90", "p99", "max"):
        assert column in out
    assert "prompts cut from the left" in out and "pairs dropped" in out
    assert "padding at batch size 4:" in out and "usable pairs: 300 of 300 rows" in out
    assert "── prompt (" in out and "▶── chosen reply (" in out and "▶── rejected reply (" in out
    assert "<|im_start|>assistant⏎" in out  # the generation prompt ends the masked prompt


def test_inspect_marks_truncation(fixture_data: Path, capsys) -> None:
    code, out, _ = run_cli(
        capsys,
        "inspect",
        str(fixture_data / "llamafactory_dpo_en_demo.json"),
        "--model",
        str(TOKENIZERS / "smollm-360m-instruct"),
        "--max-length",
        "64",
        "--max-prompt-length",
        "8",
    )
    assert code == 0
    assert "✂ prompt truncated from the left to 8 tokens" in out
    assert "✂ reply truncated at max_length" in out


def test_inspect_exits_2_on_bad_data_and_0_when_skipping(tmp_path: Path, capsys) -> None:
    require = TOKENIZERS / "qwen2.5-0.5b-instruct"
    if not require.exists():
        pytest.skip("shared fixtures absent")
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"})
        + "\n"
        + json.dumps({"prompt": "Hi", "chosen": "", "rejected": "Bye"})
        + "\n"
    )
    code, out, err = run_cli(capsys, "inspect", str(path), "--model", str(require))
    assert code == 2 and f"{path}:2: field 'chosen' is empty" in err and "Traceback" not in err
    code, out, _ = run_cli(capsys, "inspect", str(path), "--model", str(require), "--skip-invalid")
    assert code == 0 and "skipped 1 invalid rows (1 empty field)" in out
    code, _, err = run_cli(capsys, "inspect", str(path), "--model", str(tmp_path / "no-model"), "--skip-invalid")
    assert code == 2 and "no-model: no such folder" in err


def test_inspect_exits_2_when_truncation_leaves_nothing(fixture_data: Path, capsys) -> None:
    code, _, err = run_cli(
        capsys,
        "inspect",
        str(fixture_data / "llamafactory_dpo_en_demo.json"),
        "--model",
        str(TOKENIZERS / "qwen2.5-0.5b-instruct"),
        "--max-length",
        "20",
        "--max-prompt-length",
        "0",
    )
    assert code == 2 and "no usable pair" in err and "Raise max_length" in err


def test_duet_console_script_runs(fixture_data: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "core.cli",
            "inspect",
            str(fixture_data / "torchtune_hh_rlhf_tiny.json"),
            "--model",
            str(TOKENIZERS / "smollm-360m-instruct"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "format implicit, 1 rows → 1 pairs" in result.stdout


def test_inspect_lists_every_bad_row_the_strict_error_counts(tmp_path: Path, capsys) -> None:
    from tests.helpers import DEMO_MODEL

    good = json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"})
    bad = [json.dumps({"prompt": "Hi", "chosen": "", "rejected": f"Bye {i}"}) for i in range(12)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, *bad]) + "\n")
    code, _, err = run_cli(capsys, "inspect", str(path), "--model", str(DEMO_MODEL))
    assert code == 2 and "11 more of the 13 rows are bad too (12 in all)" in " ".join(err.split())
    code, out, _ = run_cli(capsys, "inspect", str(path), "--model", str(DEMO_MODEL), "--skip-invalid")
    assert code == 0 and "skipped 12 invalid rows" in out
    assert all(f"{path}:{line}: field 'chosen' is empty" in out for line in range(2, 14))  # all, not the first 10
