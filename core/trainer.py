"""The backend-agnostic training loop.

``train()`` takes the backend, the objective, the prepared data and a callback, and runs optimizer steps
until done or asked to stop, evaluating and checkpointing on the way. It knows nothing of torch or MLX.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core import faults
from core.batching import collate, plan_batches
from core.checkpoint import TrainerState, save_checkpoint
from core.config import Config
from core.distributed import SINGLE, Collective
from core.errors import DuetError
from core.events import (
    Callback,
    CheckpointSaved,
    Evaluation,
    Paused,
    Resumed,
    RunWarning,
    ThreadsChanged,
    TrainStep,
)
from core.metrics import format_duration
from core.objectives import Objective
from core.progress import PhaseProgress
from core.reference import ReferenceLogps
from core.schedule import learning_rate, warmup_steps
from core.tokenization import TokenizedPair

if TYPE_CHECKING:
    from core.backend import Backend, StepResult, UpdateResult


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
    collective: Collective = SINGLE  # under torchrun: this rank, and how to reach the others


def schedule_length(num_pairs: int, config: Config, world_size: int = 1) -> tuple[int, int]:
    """(micro-batches per epoch, total optimizer steps). A global micro-batch holds batch_size pairs per rank."""
    train = config.train
    per_batch = train.batch_size * world_size
    batches_per_epoch = max(1, num_pairs // per_batch if world_size > 1 else math.ceil(num_pairs / per_batch))
    if train.max_steps is not None:
        return batches_per_epoch, train.max_steps
    return batches_per_epoch, max(1, math.ceil(train.epochs * batches_per_epoch / train.grad_accum))


def micro_batches(data: TrainData, config: Config, epoch: int, position: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(epoch, position after this micro-batch, the global micro-batch's pair positions) forever, from
    ``(epoch, position)`` on. Each epoch's order is a pure function of the seed and the epoch, the same on
    every rank, so a resumed run, or a run on more ranks, sees exactly the pairs it would have. Under
    torchrun a last incomplete global batch is dropped: every rank needs pairs."""
    lengths = [p.length for p in data.train]
    world = data.collective.world_size
    while True:
        plan = plan_batches(
            lengths,
            config.train.batch_size * world,
            seed=config.train.seed,
            epoch=epoch,
            group_by_length=config.train.group_by_length,
            drop_last=world > 1,
            shuffle=config.train.shuffle,
        )
        for index in range(position, len(plan)):
            yield epoch, index + 1, plan[index]
        epoch, position = epoch + 1, 0


def reduce_results(results: list[StepResult], collective: Collective) -> tuple[dict[str, float], np.ndarray, int, int]:
    """(pair-weighted mean metrics, every pair's margin, pairs, tokens) over micro-batches and ranks."""
    keys = sorted(results[0].metrics)
    local = [sum(r.metrics[k] * r.num_pairs for r in results) for k in keys]
    local += [sum(r.num_pairs for r in results), sum(r.num_tokens for r in results)]
    totals = collective.sum(np.array(local))
    pairs, tokens = int(totals[-2]), int(totals[-1])
    margins = collective.gather(np.concatenate([r.margins for r in results]))[:, 0]
    return {k: float(v) / max(pairs, 1) for k, v in zip(keys, totals[:-2], strict=True)}, margins, pairs, tokens


def evaluate_split(
    backend: Backend,
    objective: Objective,
    pairs: list[TokenizedPair],
    reference: ReferenceLogps | None,
    config: Config,
    pad_id: int,
    pad_to_multiple_of: int = 1,
    collective: Collective = SINGLE,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics over a whole split (pair-weighted means) and every pair's margin; each rank takes its share.
    ``progress(done, total)`` follows this rank's pairs."""
    mine = collective.shard(sorted(range(len(pairs)), key=lambda i: -pairs[i].length))
    results = []
    size = config.train.batch_size
    for start in range(0, len(mine), size):
        batch = collate([pairs[i] for i in mine[start : start + size]], pad_id, pad_to_multiple_of)
        ref = None if reference is None else reference.for_batch(batch.pair_indices)
        results.append(backend.evaluate(batch, objective, ref, config.objective.nll_weight))
        faults.reach("eval.batch")
        if progress is not None:
            progress(min(start + size, len(mine)), len(mine))
    if not results:  # a rank with no evaluation pairs still takes part in the sums
        results = [StepResultShape.empty(objective, config)]
    metrics, margins, _, _ = reduce_results(results, collective)
    return metrics, margins


class StepResultShape:
    """A zero-pair result with the right metric names, for a rank that has nothing to evaluate."""

    @staticmethod
    def empty(objective: Objective, config: Config) -> StepResult:
        from core.backend import StepResult
        from core.objectives import metric_names

        return StepResult({k: 0.0 for k in metric_names(objective, config.objective.nll_weight)}, np.zeros(0), 0, 0)


def _describe_batch(micro: list[tuple[int, int, np.ndarray]], data: TrainData) -> str:
    epoch, position, _ = micro[-1]
    first = micro[0][1]
    indices = [data.train[i].index for _, _, batch in micro for i in batch]
    shown = ", ".join(map(str, indices[:8])) + (", ..." if len(indices) > 8 else "")
    return f"epoch {epoch}, micro-batches {first}-{position} (data pairs {shown})"


def gather_rng_states(backend: Backend, collective: Collective) -> dict[str, np.ndarray]:
    """This process's RNG state, or under torchrun every rank's, keyed ``rank<r>.<name>``."""
    local = backend.rng_state()
    if not collective.enabled:
        return local
    states = {}
    for name in sorted(local):
        rows = collective.gather(local[name].reshape(1, -1).astype(np.float64))
        for rank, row in enumerate(rows):
            states[f"rank{rank}.{name}"] = row.astype(local[name].dtype)
    return states


@dataclass
class StepOutcome:
    """One optimizer step: its micro-batches (global pair positions), the reduced results, the rate used and
    what the update did."""

    micro: list[tuple[int, int, np.ndarray]]
    metrics: dict[str, float]
    margins: np.ndarray
    pairs: int
    tokens: int
    lr: float
    loss_finite: bool
    update: UpdateResult | None  # None when a non-finite loss kept the update from being tried


def optimizer_step(
    backend: Backend, objective: Objective, data: TrainData, config: Config, stream, lr: float
) -> StepOutcome:
    """Forward/backward over ``grad_accum`` micro-batches, each rank on its share, then the update, unless a
    loss was not finite on any rank. Each micro-batch's loss is weighted by its share of the step's pairs
    (times the world size, as DDP averages gradients over ranks): the step's gradient is that of the mean
    loss over all its pairs, however they were split."""
    collective = data.collective
    micro = [next(stream) for _ in range(config.train.grad_accum)]
    step_pairs = sum(len(indices) for _, _, indices in micro)
    results = []
    for number, (_, _, indices) in enumerate(micro):
        batch = collate([data.train[i] for i in collective.shard(list(indices))], data.pad_id, data.pad_to_multiple_of)
        reference = None if objective.is_reference_free else data.train_reference.for_batch(batch.pair_indices)
        scale = batch.num_pairs / step_pairs * collective.world_size
        results.append(
            backend.forward_backward(
                batch, objective, reference, config.objective.nll_weight, scale=scale, sync=number == len(micro) - 1
            )
        )
    faults.reach("step.backward")  # gradients computed, the update not yet applied
    metrics, margins, pairs, tokens = reduce_results(results, collective)
    local_finite = all(math.isfinite(r.metrics["loss"]) for r in results)
    loss_finite = not collective.any(not local_finite)
    if not loss_finite:
        backend.discard_gradients()
        return StepOutcome(micro, metrics, margins, pairs, tokens, lr, False, None)
    update = backend.apply_gradients(lr, config.train.max_grad_norm)
    return StepOutcome(micro, metrics, margins, pairs, tokens, lr, True, update)


def check_finite(outcome: StepOutcome, state: TrainerState, config: Config, data: TrainData, emit: Callback) -> None:
    """Warn about a skipped step; raise when the run should stop (the default, or past the skip limit)."""
    step = state.step + 1
    if outcome.loss_finite and outcome.update.applied:
        return
    if outcome.loss_finite and outcome.update.overflow:
        emit(
            RunWarning(
                step=step,
                message=f"step {step}: fp16 loss scale overflowed; the scale was "
                "lowered and this step skipped (normal early in fp16 training)",
            )
        )
        return
    what = "loss" if not outcome.loss_finite else f"gradient (norm {outcome.update.grad_norm})"
    message = (
        f"step {step}: the {what} is not finite at {_describe_batch(outcome.micro, data)}; the update was not applied"
    )
    state.skipped_steps += 1
    tc = config.train
    if tc.nonfinite == "stop" or state.skipped_steps > tc.max_skipped_steps:
        limit = "" if tc.nonfinite == "stop" else f" ({state.skipped_steps} skipped, limit {tc.max_skipped_steps})"
        raise NonFiniteError(
            f"{message}{limit}. The newest checkpoint is the last good state. Lower train.lr, "
            "check the data at these pairs, or set train.nonfinite=skip."
        )
    emit(RunWarning(step=step, message=message + "; skipped"))


def train_event(
    outcome: StepOutcome,
    state: TrainerState,
    backend: Backend,
    elapsed: float,
    step_seconds: float,
    batches_per_epoch: int,
) -> TrainStep:
    return TrainStep(
        step=state.step,
        total_steps=state.total_steps,
        epoch=round(state.epoch + state.batch_in_epoch / batches_per_epoch, 4),
        metrics=dict(outcome.metrics),
        learning_rate=outcome.lr,
        grad_norm=outcome.update.grad_norm if outcome.update else None,
        tokens_per_second=outcome.tokens / elapsed if elapsed > 0 else None,
        pairs=outcome.pairs,
        tokens=outcome.tokens,
        elapsed=state.elapsed_seconds,
        eta=step_seconds * (state.total_steps - state.step),
        margins=outcome.margins.round(6).tolist(),
        memory=backend.memory(),
    )


def eval_event(
    backend: Backend, objective: Objective, data: TrainData, config: Config, step: int, emit: Callback
) -> Evaluation:
    """The held-out split's metrics (pair-weighted means) and every pair's margin, at ``step``."""
    progress = PhaseProgress(emit, "eval", f"evaluation at step {step}", len(data.eval))
    metrics, margins = evaluate_split(
        backend,
        objective,
        data.eval,
        data.eval_reference,
        config,
        data.pad_id,
        data.pad_to_multiple_of,
        data.collective,
        progress,
    )
    return Evaluation(step=step, metrics=dict(metrics), margins=margins.round(6).tolist(), pairs=len(data.eval))


def save_step(
    backend: Backend,
    state: TrainerState,
    run_dir: Path,
    keep: int,
    collective: Collective,
    emit: Callback,
    metrics_offset: Callable[[], int],
) -> None:
    """A checkpoint of this step, with every rank's dropout stream for an exact resume; rank 0 writes it."""
    rng = gather_rng_states(backend, collective)
    if not collective.is_main:
        return
    state.metrics_offset = metrics_offset()
    path = save_checkpoint(run_dir, backend, state, keep, rng)
    emit(
        CheckpointSaved(
            step=state.step,
            path=str(path),
            message=f"checkpoint saved: {path} (step {state.step}, "
            f"{format_duration(state.elapsed_seconds)} of training)",
        )
    )


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
    collective = data.collective
    stream = micro_batches(data, config, state.epoch, state.batch_in_epoch)
    batches_per_epoch, _ = schedule_length(len(data.train), config, collective.world_size)
    step_seconds: float | None = None
    saved_step = state.step  # a fresh run has nothing to save at step 0; a resumed one starts at a checkpoint
    # under torchrun, decisions are taken together: a rank that got SIGTERM stops the others with it
    while state.step < state.total_steps:
        if collective.any(control.stop_requested):
            # a stop that arrived after the last step's save decision still leaves that step saved
            if state.step != saved_step:
                save_step(backend, state, run_dir, tc.keep_checkpoints, collective, emit, metrics_offset)
            break
        if control.paused:
            emit(Paused(step=state.step, message=f"paused at step {state.step}"))
            control.wait_while_paused()
            emit(Resumed(step=state.step, message=f"resumed at step {state.step}"))
            if control.stop_requested:
                continue  # the loop's head saves and stops
        with control.step_lock:
            started = time.perf_counter()
            lr = learning_rate(state.step, total_steps=state.total_steps, peak=tc.lr, warmup=warmup, kind=tc.schedule)
            outcome = optimizer_step(backend, objective, data, config, stream, lr)
            state.epoch, state.batch_in_epoch = outcome.micro[-1][0], outcome.micro[-1][1]
            check_finite(outcome, state, config, data, emit)
            state.step += 1
            faults.reach("step.updated")  # the update applied, nothing logged or saved yet
            elapsed = time.perf_counter() - started
            step_seconds = elapsed if step_seconds is None else 0.8 * step_seconds + 0.2 * elapsed
            state.tokens_seen += outcome.tokens
            state.pairs_seen += outcome.pairs
            state.elapsed_seconds += elapsed
            last = state.step == state.total_steps
            if state.step % tc.log_every == 0 or last:
                emit(train_event(outcome, state, backend, elapsed, step_seconds, batches_per_epoch))
            if data.eval and ((tc.eval_every and state.step % tc.eval_every == 0) or last):
                emit(eval_event(backend, objective, data, config, state.step, emit))
            moved = backend.between_steps()
            if moved is not None:  # logged before the checkpoint, so a resume starts from this count
                threads, why = moved
                plural = "s" if threads != 1 else ""
                emit(
                    ThreadsChanged(
                        step=state.step,
                        threads=threads,
                        message=f"after step {state.step}: now {threads} thread{plural} ({why})",
                    )
                )
            save_now = collective.any(control.take_save_request() or control.stop_requested)
            if (tc.save_every and state.step % tc.save_every == 0) or last or save_now:
                save_step(backend, state, run_dir, tc.keep_checkpoints, collective, emit, metrics_offset)
                saved_step = state.step
    return state
