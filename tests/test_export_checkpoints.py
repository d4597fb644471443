"""Exporting a stopped run names the checkpoint step it used; checkpoints carry Duet's own short card."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from core.cli import main as duet
from core.export import export_adapter
from core.run import run
from core.trainer import RunControl
from tests.helpers import quick_config


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A torch run of 6 steps stopped after step 3: checkpoints, no final adapter."""
    control = RunControl()

    def stop_at_three(event: dict) -> None:
        if event["type"] == "train" and event["step"] == 3:
            control.request_stop("test interruption")

    config = quick_config(tmp_path_factory.mktemp("stopped"), train={"max_steps": 6, "save_every": 2})
    result = run(config, console=Console(file=io.StringIO()), callback=stop_at_three, control=control)
    assert result.stopped and result.adapter_dir is None
    return result.run_dir


def test_exporting_a_stopped_run_says_which_checkpoint_step_it_used(stopped_run, tmp_path, capsys) -> None:
    assert duet(["export", str(stopped_run), "--to", "peft", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "the newest checkpoint, step 3 of 6 (the run has no final adapter)" in printed, printed
    assert "step-00000003" in printed
    result = export_adapter(stopped_run, "mlx", tmp_path / "api")
    assert (result.source.step, result.source.total_steps, result.source.checkpoint) == (3, 6, True)
    assert result.source.folder.name == "step-00000003" and result.out == tmp_path / "api"
    # the export carries the checkpoint's card, which names the step too
    assert "# Duet checkpoint: step 3 of 6" in (tmp_path / "api" / "README.md").read_text()


def test_a_checkpoint_given_directly_reports_its_own_step(stopped_run, tmp_path) -> None:
    older = stopped_run / "checkpoints" / "step-00000002"
    result = export_adapter(older, "peft", tmp_path / "older")
    assert (result.source.step, result.source.checkpoint, result.source.newest) == (2, True, False)
    assert "checkpoint at step 2 of 6" in result.source.describe()


def test_checkpoints_carry_duets_short_card_not_pefts_template(stopped_run) -> None:
    card = (stopped_run / "checkpoints" / "step-00000003" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\nbase_model: ")
    assert "# Duet checkpoint: step 3 of 6" in card
    assert f"python -m core.run --resume {stopped_run}" in card
    assert "More Information Needed" not in card  # PEFT's 200-line template
    assert len(card.splitlines()) < 30
