"""Headless training: ``python -m core.run [--config FILE] [--resume RUN_DIR] [key=value ...]``.

With no arguments it trains the built-in demo. The same run is one call from Python::

    from core.run import run
    result = run("run.yaml", ["objective.beta=0.05"])
    print(result.adapter_dir, result.final_metrics)

A run: the config (``app.settings``), the backend with its model and LoRA and the tokenized data
(``_prepare``), a locked run directory (rank 0 creates it under torchrun), the reference log-probs
(``app.references``), training (``core.trainer``), then the adapter exported into the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from app.backends import join_job
from app.events import Events
from app.references import reference_logps
from app.reports import data_warnings, demo_report_event, model_notes, padding_report, sample_replies_event
from app.settings import RESUME_OVERRIDABLE, absolute_paths, resolve_config
from app.signals import stop_on_signals
from core import faults
from core.atomic import atomic_directory, write_text
from core.backend import Backend
from core.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, read_state
from core.config import Config, ConfigError
from core.distributed import Collective, DistributedError
from core.errors import DuetError
from core.events import Callback, Event, Failed, Finished, Info, RunStarted, RunWarning, Stopped, ThreadsChanged
from core.fingerprint import cache_root, tokens_fingerprint
from core.metrics import ConsoleReporter, MetricsLog, parse_lines, read_metrics, truncate_metrics
from core.model_card import model_card
from core.models_io import resolve_model_path
from core.objectives import Objective, build_objective
from core.prepare import PreparedData, prepare_data, unpaired_needs
from core.progress import PhaseProgress
from core.rundir import RunDirectory, RunDirError
from core.trainer import RunControl, TrainData, schedule_length, train

__all__ = ["Hooks", "RunResult", "absolute_paths", "build_parser", "main", "resolve_config", "run"]


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path | None
    final_metrics: dict[str, Any]
    state: TrainerState
    stopped: bool = False
    demo: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list, repr=False)


@dataclass
class Hooks:
    """How a caller follows and steers a run: every event to ``callback``; ``control`` pauses, stops or
    checkpoints it from another thread; ``on_ready(backend, data)`` once the model and data are loaded (the
    TUI generates with them); signals stop it with a checkpoint when ``handle_signals``."""

    callback: Callback | None = None
    console: Console = field(default_factory=lambda: Console(soft_wrap=True))
    control: RunControl = field(default_factory=RunControl)
    handle_signals: bool = True
    on_ready: Callable[[Any, PreparedData], None] | None = None


@dataclass
class Job:
    """What the phases of one run (in one process) share."""

    cfg: Config
    backend: Backend
    data: PreparedData
    objective: Objective
    run_dir: RunDirectory
    collective: Collective
    hooks: Hooks
    resumed: bool
    emit: Events = field(default_factory=lambda: Events([]))
    metrics_log: MetricsLog | None = None

    @property
    def pad_multiple(self) -> int:
        return getattr(self.backend, "pad_to_multiple_of", 1)


def run(
    config: Config | str | Path | dict | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    resume: str | Path | None = None,
    callback: Callback | None = None,
    console: Console | None = None,
    control: RunControl | None = None,
    handle_signals: bool = True,
    on_ready: Callable[[Any, PreparedData], None] | None = None,
) -> RunResult:
    """Train as the config says (or go on with the run in ``resume``); returns where the adapter is and the
    final metrics. The keyword arguments are the `Hooks`."""
    hooks = Hooks(callback, console or Console(soft_wrap=True), control or RunControl(), handle_signals, on_ready)
    run_dir = None if resume is None else _open_for_resume(resume, overrides)
    cfg = resolve_config(config, overrides) if run_dir is None else run_dir.load_config(overrides)
    if cfg.rounds.count:  # sample → judge → train → evaluate, round after round
        from app.rounds import run_rounds

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("rounds (rounds.count > 0) run in one process; start them without torchrun.")

        return run_rounds(cfg, resume=run_dir, callback=callback, console=console)  # type: ignore[return-value]
    collective, device = join_job(cfg)
    try:
        if run_dir is None:
            return _new_run(cfg, collective, device, hooks)
        return _resumed_run(run_dir, cfg, bool(overrides), collective, device, hooks)
    finally:
        collective.close()


def _open_for_resume(resume: str | Path, overrides: list[str] | tuple[str, ...]) -> RunDirectory:
    """The run directory to resume (only read: nothing is touched before its lock is held), after checking
    that the overrides change only how long the run goes on and how often it reports."""
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key not in RESUME_OVERRIDABLE:
            raise ConfigError(
                f"{key}: cannot change when resuming (it would change what the run learns); "
                f"a resumed run may change {', '.join(RESUME_OVERRIDABLE)}."
            )
    return RunDirectory.open(resume)


def _new_run(cfg: Config, collective: Collective, device: str, hooks: Hooks) -> RunResult:
    backend, data, objective = _prepare(cfg, collective, device, hooks)
    run_dir = _shared_run_directory(cfg, data, collective)
    job = Job(cfg, backend, data, objective, run_dir, collective, hooks, resumed=False)
    with run_dir.lock() if collective.is_main else contextlib.nullcontext():
        return _execute(job, None)


def _shared_run_directory(cfg: Config, data: PreparedData, collective: Collective) -> RunDirectory:
    """Rank 0 creates the run directory; the other ranks learn where it is (or why it could not be)."""
    if not collective.enabled:
        return RunDirectory.create(cfg, fingerprints=_fingerprints(data))
    if collective.is_main:
        try:
            run_dir = RunDirectory.create(cfg, fingerprints=_fingerprints(data))
        except DuetError as exc:
            collective.broadcast_text(f"\0{exc}")
            raise
        collective.broadcast_text(f"{run_dir.path}\n{run_dir.run_id}")
        return run_dir
    shared = collective.broadcast_text(None)
    if shared.startswith("\0"):
        raise DistributedError(f"rank 0 could not create the run directory: {shared[1:]}")
    path, run_id = shared.split("\n")
    return RunDirectory(Path(path), run_id)


def _resumed_run(
    run_dir: RunDirectory, cfg: Config, changed: bool, collective: Collective, device: str, hooks: Hooks
) -> RunResult:
    # the lock first: never clean up or read what another live run is writing
    with run_dir.lock() if collective.is_main else contextlib.nullcontext():
        if collective.is_main:
            run_dir.remove_stale_temporaries()
        collective.barrier()
        backend, data, objective = _prepare(cfg, collective, device, hooks)
        threads = _threads_at_checkpoint(run_dir)
        if threads:
            backend.continue_threads(threads)  # before any compute (a no-op unless model.threads=auto)
        run_dir.check_fingerprints(_fingerprints(data))
        job = Job(cfg, backend, data, objective, run_dir, collective, hooks, resumed=True)
        state = _restore(job)
        if collective.is_main:
            truncate_metrics(run_dir.metrics_file, state.metrics_offset if state else 0)
            if changed:
                write_text(run_dir.config_file, cfg.to_yaml())
        collective.barrier()  # the metrics are cut back before any rank goes on
        return _execute(job, state)


def _threads_at_checkpoint(run_dir: RunDirectory) -> int | None:
    """The CPU thread count the run had at its newest checkpoint (at its start, when it has none): the last
    one metrics.jsonl logged before it, a start or a move under model.threads=auto. A resumed run goes on
    from it, not from a count chosen again on a machine now more or less busy: another count splits the
    reductions differently, and the resumed steps would not be bit-exact."""
    path = run_dir.metrics_file
    logged = path.read_bytes() if path.exists() else b""
    checkpoint = latest_checkpoint(run_dir.path)
    if checkpoint is None:  # the run starts over: at the count it first started on
        starts = [e.threads for e in parse_lines(logged) if isinstance(e, RunStarted) and e.threads]
        return starts[0] if starts else None
    events = parse_lines(logged[: read_state(checkpoint).metrics_offset])
    counts = [e.threads for e in events if isinstance(e, (RunStarted, ThreadsChanged)) and e.threads]
    return counts[-1] if counts else None


def _restore(job: Job) -> TrainerState | None:
    """The newest checkpoint's state, loaded into the backend (None: the run stopped before its first)."""
    checkpoint = latest_checkpoint(job.run_dir.path)
    if checkpoint is None:
        return None
    job.backend.setup_optimizer(weight_decay=job.cfg.train.weight_decay)
    state = load_checkpoint(checkpoint, job.backend, job.run_dir.run_id, rank=job.collective.rank)
    _, total = schedule_length(len(job.data.train.tokenized), job.cfg, job.collective.world_size)
    if state.step >= total and job.run_dir.adapter_dir.is_dir():
        raise RunDirError(
            f"{job.run_dir.path} finished all {state.step} steps; its adapter is in "
            f"{job.run_dir.adapter_dir}. To train on, resume with train.max_steps above {state.step}."
        )
    return state


def _prepare(cfg: Config, collective: Collective, device: str | None, hooks: Hooks):
    """The backend with its model and LoRA, the tokenized data, the objective."""
    from app.backends import create_backend

    # before the run directory exists: converting a model file or tokenizing a large data set shows its
    # progress on the console and to the caller only (rank 0 alone)
    reporter = ConsoleReporter(hooks.console)
    early = Events([reporter, *([hooks.callback] if hooks.callback else [])] if collective.is_main else [])
    try:
        location = resolve_model_path(cfg.model.path, early)  # a GGUF file is converted here, once
    finally:
        reporter.close()
    backend = create_backend(cfg, collective, device)
    backend.load_model(location, trust_remote_code=cfg.model.trust_remote_code)
    backend.seed(cfg.train.seed)  # the same LoRA initialization on every rank
    backend.attach_lora(cfg.lora, adapter_path=cfg.model.adapter)
    if collective.enabled:
        backend.seed(cfg.train.seed * 7919 + collective.rank)  # but each rank its own dropout masks
    reporter = ConsoleReporter(hooks.console)
    early.sinks = [reporter, *([hooks.callback] if hooks.callback else [])] if collective.is_main else []

    def progress(source: str) -> PhaseProgress:
        return PhaseProgress(early, "tokenize", f"tokenizing {Path(source).name}", 0)

    try:
        data = prepare_data(
            cfg.data,
            backend.tokenizer,
            cfg.train.seed,
            cache_root(cfg.train.cache_dir),
            progress,
            unpaired_needs(cfg.objective),
        )
    finally:
        reporter.close()
    return backend, data, build_objective(cfg.objective)


def _fingerprints(data: PreparedData) -> dict[str, str]:
    prints = {"train": tokens_fingerprint(data.train.tokenized)}
    if data.eval is not None:
        prints["eval"] = tokens_fingerprint(data.eval.tokenized)
    return prints


def _execute(job: Job, state: TrainerState | None) -> RunResult:
    """Train and export inside a locked run directory, every event to metrics.jsonl, the console and the
    callback (under torchrun, rank 0 writes and reports; the other ranks train silently)."""
    hooks, run_dir = job.hooks, job.run_dir
    if hooks.on_ready is not None:
        hooks.on_ready(job.backend, job.data)
    earlier = read_metrics(run_dir.metrics_file) if job.resumed else []  # what the run logged before this process
    job.metrics_log = MetricsLog(run_dir.metrics_file) if job.collective.is_main else None
    reporter = ConsoleReporter(hooks.console)
    callbacks = [hooks.callback] if hooks.callback else []
    job.emit = Events([job.metrics_log, reporter, *callbacks] if job.collective.is_main else [])
    job.emit.remember(earlier)
    try:
        return _train_and_export(job, state)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            job.emit(Failed(message="interrupted; the newest checkpoint is intact"))
        else:
            message = str(exc) if isinstance(exc, DuetError) else f"{type(exc).__name__}: {exc}"
            job.emit(Failed(message=message))
        raise
    finally:
        reporter.close()
        if job.metrics_log is not None:
            job.metrics_log.close()


def _train_and_export(job: Job, state: TrainerState | None) -> RunResult:
    emit, cfg, backend, data = job.emit, job.cfg, job.backend, job.data
    for warning in [*backend.config_warnings, *model_notes(backend.model_location), *data_warnings(data)]:
        emit(RunWarning(message=warning))
    if data.train.from_cache:
        emit(Info(message=f"tokenized pairs: reused from the cache ({data.train.load_report.source})"))
    _, total_steps = schedule_length(len(data.train.tokenized), cfg, job.collective.world_size)
    emit(Info(message=padding_report(data.train.tokenized, cfg, job.pad_multiple)))
    train_ref, eval_ref = (
        (None, None)
        if job.objective.is_reference_free
        else reference_logps(backend, data, cfg, job.run_dir, job.resumed, emit, job.pad_multiple, job.collective)
    )
    if state is None:
        backend.setup_optimizer(weight_decay=cfg.train.weight_decay)
        state = TrainerState(job.run_dir.run_id, total_steps, backend=backend.name)
    state.total_steps = total_steps
    emit(_start_event(job, state))
    eval_pairs = data.eval.tokenized if data.eval else []
    train_data = TrainData(
        data.train.tokenized, eval_pairs, train_ref, eval_ref, data.chat.pad_id, job.pad_multiple, job.collective
    )
    hooks = job.hooks
    with stop_on_signals(hooks.control, lambda m: hooks.console.print(m, highlight=False), hooks.handle_signals):
        offset = job.metrics_log.offset if job.metrics_log else (lambda: 0)
        state = train(
            backend,
            job.objective,
            train_data,
            cfg,
            state,
            run_dir=job.run_dir.path,
            emit=emit,
            control=hooks.control,
            metrics_offset=offset,
        )
    if state.step < state.total_steps:
        return _stopped(job, state)
    return _finished(job, state)


def _start_event(job: Job, state: TrainerState) -> RunStarted:
    cfg, backend, data, collective = job.cfg, job.backend, job.data, job.collective
    info = backend.info()
    count = collective.world_size
    processes = f", {count} process{'es' if count > 1 else ''}" if collective.enabled else ""
    # the CPU threads the backend chose, and why (torch: model.threads, OMP_NUM_THREADS or auto's figures)
    count_threads = info.details.get("threads")
    threads = (
        f", {count_threads} thread{'s' if count_threads != 1 else ''} by {info.details['threads_source']}"
        if count_threads
        else ""
    )
    return RunStarted(
        run_dir=str(job.run_dir.path),
        total_steps=state.total_steps,
        start_step=state.step,
        resumed=job.resumed,
        backend=info.name,
        device=info.device,
        dtype=info.dtype,
        objective=cfg.objective.name,
        model=cfg.model.path,
        train_pairs=len(data.train.tokenized),
        eval_pairs=len(data.eval.tokenized) if data.eval else 0,
        trainable_parameters=backend.trainable_parameters(),
        total_parameters=backend.total_parameters(),
        threads=count_threads,
        world_size=collective.world_size,
        message=f"{'resuming' if job.resumed else 'training'} {cfg.objective.name} on {info.name} "
        f"({info.device}, {info.dtype}{processes}{threads}): {len(data.train.tokenized)} "
        f"{'examples' if job.objective.unpaired else 'pairs'}, "
        f"{state.total_steps} steps, run {job.run_dir.path}",
    )


def _stopped(job: Job, state: TrainerState) -> RunResult:
    reason = job.hooks.control.reason
    job.emit(
        Stopped(
            step=state.step,
            reason=reason,
            message=f"stopped at step {state.step}/{state.total_steps} ({reason}); resume with: "
            f"python -m core.run --resume {job.run_dir.path}",
        )
    )
    return RunResult(job.run_dir.path, None, job.emit.final_metrics(), state, stopped=True, events=job.emit.history)


def _evaluate_at_end(job: Job, state: TrainerState) -> None:
    """``evaluation.at_end``: the tuned model against the base on held-out prompts, with the backend the run
    trained on; the report goes to RUN/eval. A failing evaluation does not fail the finished run."""
    from app.evaluate import REPORT_FOLDER, Target, evaluate_loaded, headline, load_judge

    if job.collective.world_size > 1:
        job.emit(RunWarning(message=f"evaluation.at_end is skipped under torchrun: run `duet eval {job.run_dir.path}`"))
        return
    target = Target(job.cfg, job.run_dir.adapter_dir, job.run_dir.path, job.run_dir.path.name, state.step)
    try:
        result = evaluate_loaded(
            job.backend,
            job.data.chat,
            job.cfg,
            target,
            judge=load_judge(job.cfg),
            out=job.run_dir.path / REPORT_FOLDER,
            emit=job.emit,
        )
    except DuetError as exc:
        job.emit(RunWarning(message=f"the evaluation at the end failed: {exc}"))
        return
    job.emit(Info(message=f"{headline(result.report)}\nreport: {result.folder}/eval.md"))


def _finished(job: Job, state: TrainerState) -> RunResult:
    """Rank 0 exports the adapter (the same on every rank) into the run directory and writes the reports; the
    others wait for all of it: a rank that tears its process group down while another still uses it can abort
    in gloo's teardown (seen once as "terminate called without an active exception" on rank 1 while rank 0
    still sampled the demo's replies)."""
    emit, run_dir, final = job.emit, job.run_dir, job.emit.final_metrics()
    if not job.collective.is_main:
        job.collective.barrier()  # the adapter is written
        job.collective.barrier()  # rank 0 is done: every rank tears down together
        return RunResult(run_dir.path, run_dir.adapter_dir, final, state, events=emit.history)
    with atomic_directory(run_dir.adapter_dir, replace=True) as folder:
        job.backend.save_adapter(folder)
        faults.reach("export.adapter")
        card = model_card(
            job.cfg,
            base_model=job.backend.model_location,
            data_fingerprint=tokens_fingerprint(job.data.train.tokenized),
            final_metrics=final,
            pairs=len(job.data.train.tokenized),
            steps=state.step,
            backend=job.backend.name,
        )
        write_text(folder / "README.md", card)
    job.collective.barrier()
    demo = demo_report_event(job.backend, job.data, emit) if job.cfg.data.train == "demo" and job.data.eval else None
    train = job.cfg.train
    sample_replies_event(job.backend, job.data, train.sample_replies, train.sample_max_new_tokens, emit)
    if job.cfg.evaluation.at_end:
        _evaluate_at_end(job, state)
    emit(
        Finished(
            step=state.step,
            adapter=str(run_dir.adapter_dir),
            final=final,
            message=f"done: the adapter is in {run_dir.adapter_dir}",
        )
    )
    job.collective.barrier()
    return RunResult(run_dir.path, run_dir.adapter_dir, final, state, demo=demo, events=emit.history)


def build_parser() -> argparse.ArgumentParser:
    from core.config import config_keys_text

    parser = argparse.ArgumentParser(
        prog="python -m core.run",
        description="Train a LoRA adapter with a preference objective (no arguments: the built-in demo).",
        epilog="config keys, set as key=value or in the --config file (`duet config --yaml` prints a commented\n"
        f"file with every default):\n{config_keys_text()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (default: the demo's models/demo/run.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its newest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. objective.beta=0.05 train.lr=1e-5")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    errors = Console(stderr=True, soft_wrap=True)
    try:
        if args.resume and args.config:
            raise ConfigError("--resume takes the config saved in the run directory; drop --config.")
        run(args.config, args.overrides, resume=args.resume)
    except DuetError as exc:
        errors.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        errors.print("interrupted at once; the newest checkpoint is intact.")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
