"""The backend-agnostic training loop.

``train()`` takes the backend, the objective, the prepared data and a callback, and runs optimizer steps
until done or asked to stop, evaluating and checkpointing on the way. It knows nothing of torch or MLX.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.batching import Batch, collate, plan_batches
from core.checkpoint import TrainerState, save_checkpoint
from core.config import Config
from core.errors import DuetError
from core.metrics import Callback, format_duration
from core.objectives import Objective
from core.reference import ReferenceLogps
from core.schedule import learning_rate, warmup_steps
from core.tokenization import TokenizedPair

if TYPE_CHECKING:
    from backends.base import Backend, StepResult, UpdateResult


class NonFiniteError(DuetError):
    """A loss or gradient became NaN or infinite; the update was not applied."""

    exit_code = 3


class RunControl:
    """Asks a running loop to stop, pause or save a checkpoint, from a signal handler or another thread (the
    TUI). The loop acts between optimizer steps, so nothing is ever interrupted half-way."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._save = threading.Event()
        self.reason = ""
        # held for each whole step (update, evaluation, checkpoint): others use the model in between
        self.step_lock = threading.Lock()

    def request_stop(self, reason: str = "stop requested") -> None:
        self.reason = reason
        self._stop.set()
        self._running.set()  # a paused run wakes up to stop

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_while_paused(self) -> None:
        self._running.wait()

    def request_save(self) -> None:
        self._save.set()

    def take_save_request(self) -> bool:
        requested = self._save.is_set()
        self._save.clear()
        return requested


@dataclass
class TrainData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    train_reference: ReferenceLogps | None
    eval_reference: ReferenceLogps | None
    pad_id: int
    pad_to_multiple_of: int = 1


def schedule_length(num_pairs: int, config: Config) -> tuple[int, int]:
    """(micro-batches per epoch, total optimizer steps)."""
    train = config.train
    batches_per_epoch = max(1, math.ceil(num_pairs / train.batch_size))
    if train.max_steps is not None:
        return batches_per_epoch, train.max_steps
    return batches_per_epoch, max(1, math.ceil(train.epochs * batches_per_epoch / train.grad_accum))


def micro_batches(data: TrainData, config: Config, epoch: int, position: int) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, position after this batch, batch) forever, from ``(epoch, position)`` on; each epoch's order is
    a pure function of the seed and the epoch, so a resumed run sees exactly the batches it would have."""
    lengths = [p.length for p in data.train]
    while True:
        plan = plan_batches(
            lengths,
            config.train.batch_size,
            seed=config.train.seed,
            epoch=epoch,
            group_by_length=config.train.group_by_length,
        )
        for index in range(position, len(plan)):
            pairs = [data.train[i] for i in plan[index]]
            yield epoch, index + 1, collate(pairs, data.pad_id, data.pad_to_multiple_of)
        epoch, position = epoch + 1, 0


def _weighted_mean(results: list[StepResult]) -> dict[str, float]:
    pairs = sum(r.num_pairs for r in results)
    keys = results[0].metrics.keys()
    return {k: sum(r.metrics[k] * r.num_pairs for r in results) / pairs for k in keys}


def evaluate_split(
    backend: Backend,
    objective: Objective,
    pairs: list[TokenizedPair],
    reference: ReferenceLogps | None,
    config: Config,
    pad_id: int,
    pad_to_multiple_of: int = 1,
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics over a whole split (pair-weighted means) and every pair's margin."""
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].length)
    results, margins = [], []
    size = config.train.batch_size
    for start in range(0, len(order), size):
        batch = collate([pairs[i] for i in order[start : start + size]], pad_id, pad_to_multiple_of)
        ref = None if reference is None else reference.for_batch(batch.pair_indices)
        result = backend.evaluate(batch, objective, ref, config.objective.nll_weight)
        results.append(result)
        margins.append(result.margins)
    return _weighted_mean(results), np.concatenate(margins)


def _describe_batch(micro: list[tuple[int, int, Batch]]) -> str:
    epoch, position, _ = micro[-1]
    first = micro[0][1]
    indices = np.concatenate([b.pair_indices for _, _, b in micro]).tolist()
    shown = ", ".join(map(str, indices[:8])) + (", ..." if len(indices) > 8 else "")
    return f"epoch {epoch}, micro-batches {first}-{position} (data pairs {shown})"


@dataclass
class StepOutcome:
    """One optimizer step: its micro-batches, their results, the rate used and what the update did."""

    micro: list[tuple[int, int, Batch]]
    results: list[StepResult]
    lr: float
    loss_finite: bool
    update: UpdateResult | None  # None when a non-finite loss kept the update from being tried

    @property
    def pairs(self) -> int:
        return sum(batch.num_pairs for _, _, batch in self.micro)

    @property
    def tokens(self) -> int:
        return sum(batch.num_tokens for _, _, batch in self.micro)


def optimizer_step(
    backend: Backend, objective: Objective, data: TrainData, config: Config, stream, lr: float
) -> StepOutcome:
    """Forward/backward over ``grad_accum`` micro-batches (each weighted by its share of the pairs), then the
    update, unless the loss is not finite."""
    micro = [next(stream) for _ in range(config.train.grad_accum)]
    pairs = sum(batch.num_pairs for _, _, batch in micro)
    results = []
    for _, _, batch in micro:
        reference = None if objective.is_reference_free else data.train_reference.for_batch(batch.pair_indices)
        results.append(
            backend.forward_backward(
                batch, objective, reference, config.objective.nll_weight, scale=batch.num_pairs / pairs
            )
        )
    loss_finite = all(math.isfinite(r.metrics["loss"]) for r in results)
    if not loss_finite:
        backend.discard_gradients()
        return StepOutcome(micro, results, lr, False, None)
    return StepOutcome(micro, results, lr, True, backend.apply_gradients(lr, config.train.max_grad_norm))


def check_finite(outcome: StepOutcome, state: TrainerState, config: Config, emit: Callback) -> None:
    """Warn about a skipped step; raise when the run should stop (the default, or past the skip limit)."""
    step = state.step + 1
    if outcome.loss_finite and outcome.update.applied:
        return
    if outcome.loss_finite and outcome.update.overflow:
        emit(
            {
                "type": "warning",
                "step": step,
                "message": f"step {step}: fp16 loss scale overflowed; the scale was "
                "lowered and this step skipped (normal early in fp16 training)",
            }
        )
        return
    what = "loss" if not outcome.loss_finite else f"gradient (norm {outcome.update.grad_norm})"
    message = f"step {step}: the {what} is not finite at {_describe_batch(outcome.micro)}; the update was not applied"
    state.skipped_steps += 1
    tc = config.train
    if tc.nonfinite == "stop" or state.skipped_steps > tc.max_skipped_steps:
        limit = "" if tc.nonfinite == "stop" else f" ({state.skipped_steps} skipped, limit {tc.max_skipped_steps})"
        raise NonFiniteError(
            f"{message}{limit}. The newest checkpoint is the last good state. Lower train.lr, "
            "check the data at these pairs, or set train.nonfinite=skip."
        )
    emit({"type": "warning", "step": step, "message": message + "; skipped"})


def train_event(
    outcome: StepOutcome,
    state: TrainerState,
    backend: Backend,
    elapsed: float,
    step_seconds: float,
    batches_per_epoch: int,
) -> dict:
    return {
        "type": "train",
        "step": state.step,
        "total_steps": state.total_steps,
        "epoch": round(state.epoch + state.batch_in_epoch / batches_per_epoch, 4),
        **_weighted_mean(outcome.results),
        "learning_rate": outcome.lr,
        "grad_norm": outcome.update.grad_norm if outcome.update else None,
        "tokens_per_second": outcome.tokens / elapsed if elapsed > 0 else None,
        "pairs": outcome.pairs,
        "tokens": outcome.tokens,
        "elapsed": state.elapsed_seconds,
        "eta": step_seconds * (state.total_steps - state.step),
        "margins": np.concatenate([r.margins for r in outcome.results]).round(6).tolist(),
        "memory": backend.memory(),
    }


def train(
    backend: Backend,
    objective: Objective,
    data: TrainData,
    config: Config,
    state: TrainerState,
    *,
    run_dir: Path,
    emit: Callback,
    control: RunControl,
    metrics_offset=lambda: 0,
) -> TrainerState:
    """Run optimizer steps from ``state`` to ``state.total_steps``. Returns the state reached."""
    tc = config.train
    warmup = warmup_steps(state.total_steps, tc.warmup_steps, tc.warmup_ratio)
    stream = micro_batches(data, config, state.epoch, state.batch_in_epoch)
    batches_per_epoch, _ = schedule_length(len(data.train), config)
    step_seconds: float | None = None
    while state.step < state.total_steps and not control.stop_requested:
        if control.paused:
            emit({"type": "paused", "step": state.step, "message": f"paused at step {state.step}"})
            control.wait_while_paused()
            emit({"type": "resumed", "step": state.step, "message": f"resumed at step {state.step}"})
            if control.stop_requested:
                break
        with control.step_lock:
            started = time.perf_counter()
            lr = learning_rate(state.step, total_steps=state.total_steps, peak=tc.lr, warmup=warmup, kind=tc.schedule)
            outcome = optimizer_step(backend, objective, data, config, stream, lr)
            state.epoch, state.batch_in_epoch = outcome.micro[-1][0], outcome.micro[-1][1]
            check_finite(outcome, state, config, emit)
            state.step += 1
            elapsed = time.perf_counter() - started
            step_seconds = elapsed if step_seconds is None else 0.8 * step_seconds + 0.2 * elapsed
            state.tokens_seen += outcome.tokens
            state.pairs_seen += outcome.pairs
            state.elapsed_seconds += elapsed
            last = state.step == state.total_steps
            if state.step % tc.log_every == 0 or last:
                emit(train_event(outcome, state, backend, elapsed, step_seconds, batches_per_epoch))
            if data.eval and ((tc.eval_every and state.step % tc.eval_every == 0) or last):
                metrics, margins = evaluate_split(
                    backend, objective, data.eval, data.eval_reference, config, data.pad_id, data.pad_to_multiple_of
                )
                emit(
                    {
                        "type": "eval",
                        "step": state.step,
                        **{f"eval_{k}": v for k, v in metrics.items()},
                        "eval_margins": margins.round(6).tolist(),
                        "eval_pairs": len(data.eval),
                    }
                )
            save_now = control.take_save_request()
            if (tc.save_every and state.step % tc.save_every == 0) or last or control.stop_requested or save_now:
                state.metrics_offset = metrics_offset()
                path = save_checkpoint(run_dir, backend, state, tc.keep_checkpoints)
                emit(
                    {
                        "type": "checkpoint",
                        "step": state.step,
                        "path": str(path),
                        "message": f"checkpoint saved: {path} (step {state.step}, "
                        f"{format_duration(state.elapsed_seconds)} of training)",
                    }
                )
    return state
