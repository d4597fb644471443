"""Checkpoints: adapter + optimizer + RNG + trainer state (data position included), written atomically."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import __version__, faults
from core.atomic import TEMP_PREFIX, atomic_directory, write_json, write_safetensors, write_text
from core.errors import DuetError
from core.model_card import checkpoint_card

if TYPE_CHECKING:
    from core.backend import Backend

CHECKPOINTS = "checkpoints"
CHECKPOINT_FORMAT = 1  # raised whenever what a checkpoint holds changes
STATE_FILE = "trainer_state.json"


class CheckpointError(DuetError):
    """A checkpoint that is missing, incomplete, or from another run."""


@dataclass
class TrainerState:
    run_id: str
    total_steps: int
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next micro-batch comes from
    batch_in_epoch: int = 0  # micro-batches of that epoch already consumed
    skipped_steps: int = 0
    tokens_seen: int = 0
    pairs_seen: int = 0
    elapsed_seconds: float = 0.0
    metrics_offset: int = 0  # size of metrics.jsonl when the checkpoint was written
    backend: str = ""
    duet_version: str = __version__
    format: int = CHECKPOINT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("format", 0)  # a state file that predates format numbers
        return cls(**values)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (an interrupted write never gets its final name)."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: Path, backend: Backend, state: TrainerState, keep: int, rng_states: dict | None = None
) -> Path:
    final = checkpoint_path(run_dir, state.step)
    with atomic_directory(final, replace=True) as folder:
        backend.save_adapter(folder)
        card = checkpoint_card(
            base_model=getattr(backend, "model_location", "") or "unknown",
            step=state.step,
            total_steps=state.total_steps,
            checkpoint=final,
            run_dir=run_dir,
            backend=backend.name,
        )
        write_text(folder / "README.md", card)  # Duet's card, not the template PEFT's save_pretrained writes
        faults.reach("checkpoint.adapter")
        arrays, scalars = backend.optimizer_state()
        write_safetensors(folder / "optimizer.safetensors", arrays)
        write_json(folder / "optimizer.json", scalars)
        faults.reach("checkpoint.optimizer")
        write_safetensors(folder / "rng.safetensors", backend.rng_state() if rng_states is None else rng_states)
        write_json(folder / STATE_FILE, state.to_dict())
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        # renamed first: a crash while deleting leaves a temporary, never a half-deleted checkpoint
        doomed = old.with_name(f"{TEMP_PREFIX}{old.name}.{os.getpid()}")
        os.replace(old, doomed)
        faults.reach("checkpoint.prune")
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> TrainerState:
    try:
        return TrainerState.from_dict(json.loads((checkpoint / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint}: not a readable Duet checkpoint ({exc}).") from None


def load_checkpoint(checkpoint: Path, backend: Backend, run_id: str, rank: int = 0) -> TrainerState:
    """Restore adapter, optimizer and RNG from ``checkpoint``; the trainer state says where to continue."""
    from safetensors.numpy import load_file

    state = read_state(checkpoint)
    if state.format != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{checkpoint}: written by Duet {state.duet_version} in checkpoint format {state.format}; "
            f"this Duet ({__version__}) reads format {CHECKPOINT_FORMAT}. Resume it with the Duet "
            "that wrote it, or start a new run."
        )
    if state.run_id != run_id:
        raise CheckpointError(
            f"{checkpoint}: this checkpoint belongs to another run ({state.run_id}, not "
            f"{run_id}); resume the run directory it came from."
        )
    if state.backend and state.backend != backend.name:
        raise CheckpointError(
            f"{checkpoint}: written by the {state.backend} backend; resume with model.backend={state.backend}."
        )
    backend.load_adapter(checkpoint)
    try:
        backend.load_optimizer_state(
            load_file(str(checkpoint / "optimizer.safetensors")),
            json.loads((checkpoint / "optimizer.json").read_text()),
        )
        rng = load_file(str(checkpoint / "rng.safetensors"))
        if any(key.startswith("rank") for key in rng):  # written under torchrun: this rank's own streams
            prefix = f"rank{rank}."
            rng = {key[len(prefix) :]: value for key, value in rng.items() if key.startswith(prefix)}
            if not rng:
                raise CheckpointError(
                    f"{checkpoint}: written by a run with fewer ranks than this one (no state "
                    f"for rank {rank}); resume with the same number of processes."
                )
        backend.set_rng_state(rng)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"{checkpoint}: incomplete or damaged checkpoint ({exc}). Delete this checkpoint folder to resume "
            "from the one before it."
        ) from None
    return state
