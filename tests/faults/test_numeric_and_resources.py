"""Numerical faults (a NaN loss or gradient) and resource faults (a full disk, out of memory)."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

import core.atomic
from backends.torch_backend.backend import OutOfMemory, TorchBackend
from core.atomic import DiskError, write_bytes
from core.checkpoint import list_checkpoints
from core.run import run
from core.trainer import NonFiniteError
from tests.helpers import quick_config


def quiet() -> Console:
    return Console(file=io.StringIO())


def poison(monkeypatch, at_call: int, what: str) -> None:
    """Make the at_call-th forward/backward produce a NaN loss, or a NaN gradient."""
    original = TorchBackend.forward_backward
    calls = {"n": 0}

    def forward_backward(self, *args, **kwargs):
        calls["n"] += 1
        result = original(self, *args, **kwargs)
        if calls["n"] == at_call:
            if what == "loss":
                result.metrics["loss"] = float("nan")
            else:
                next(p for p in self.model.parameters() if p.requires_grad).grad[0, 0] = float("nan")
        return result

    monkeypatch.setattr(TorchBackend, "forward_backward", forward_backward)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_nan_stops_the_run_at_its_step_and_the_last_good_checkpoint_stays_newest(tmp_path, monkeypatch, what):
    poison(monkeypatch, at_call=5, what=what)
    config = quick_config(tmp_path, train={"max_steps": 8, "save_every": 2})
    with pytest.raises(NonFiniteError) as error:
        run(config, console=quiet())
    message = str(error.value)
    assert (
        message.startswith(f"step 5: the {what}")
        and "is not finite at epoch 0, micro-batches 5-5 (data pairs" in message
    )
    assert "the update was not applied" in message and "train.nonfinite=skip" in message
    run_dir = next((tmp_path / "runs").iterdir())
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002", "step-00000004"]
    events = (run_dir / "metrics.jsonl").read_text()
    assert '"type":"error"' in events and "step 5" in events


def test_skipping_non_finite_steps_up_to_a_limit(tmp_path, monkeypatch):
    poison(monkeypatch, at_call=3, what="gradient")
    config = quick_config(tmp_path, train={"max_steps": 6, "nonfinite": "skip"})
    result = run(config, console=quiet())
    warnings = [e["message"] for e in result.events if e["type"] == "warning" and "not finite" in e["message"]]
    assert len(warnings) == 1 and warnings[0].startswith("step 3: the gradient") and warnings[0].endswith("skipped")
    assert result.state.skipped_steps == 1 and result.adapter_dir.is_dir()

    poison(monkeypatch, at_call=2, what="loss")
    config = quick_config(tmp_path / "limit", train={"max_steps": 6, "nonfinite": "skip", "max_skipped_steps": 0})
    with pytest.raises(NonFiniteError, match=r"\(1 skipped, limit 0\)"):
        run(config, console=quiet())


def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    target.write_text("the previous version\n")

    class FullDisk(io.BufferedWriter):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode and "b" in mode:
            handle.write = FullDisk.write.__get__(handle)  # every write fails like a full disk
        return handle

    monkeypatch.setattr(core.atomic, "open", full_open, raising=False)
    with pytest.raises(DiskError, match=r"config\.yaml: the disk is full; nothing was written there"):
        write_bytes(target, b"the new version\n")
    assert target.read_text() == "the previous version\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_full_disk_while_checkpointing_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from core import checkpoint as checkpoint_module

    original = checkpoint_module.write_safetensors
    calls = {"n": 0}

    def write_safetensors(path, arrays, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's optimizer state
            raise DiskError(f"{path}: the disk is full; nothing was written there. Free some space and retry.")
        return original(path, arrays, metadata)

    monkeypatch.setattr(checkpoint_module, "write_safetensors", write_safetensors)
    with pytest.raises(DiskError, match="the disk is full"):
        run(quick_config(tmp_path, train={"max_steps": 6, "save_every": 2}), console=quiet())
    run_dir = next((tmp_path / "runs").iterdir())
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_out_of_memory_names_the_settings_that_reduce_memory(tmp_path, monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TorchBackend, "_row_logps", out_of_memory)
    with pytest.raises(OutOfMemory) as error:
        run(quick_config(tmp_path, objective={"name": "simpo"}), console=quiet())
    message = str(error.value)
    assert message.startswith("out of memory during the training step (batch of 4 pairs")
    for setting in (
        "train.batch_size",
        "train.grad_accum",
        "data.max_length",
        "model.gradient_checkpointing",
        "model.logprob_chunk_size",
    ):
        assert setting in message


def test_out_of_memory_on_the_cpu_too(tmp_path, monkeypatch):
    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(TorchBackend, "_row_logps", no_memory)
    with pytest.raises(OutOfMemory, match="out of memory during the log-prob pass"):
        run(quick_config(Path(tmp_path)), console=quiet())
