"""Headless training: ``python -m core.run [--config FILE] [--resume RUN_DIR] [key=value ...]``.

With no arguments it trains the built-in demo. The same run is one call from Python::

    from core.run import run
    result = run("run.yaml", ["objective.beta=0.05"])
    print(result.adapter_dir, result.final_metrics)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from core import faults
from core.atomic import atomic_directory, write_safetensors, write_text
from core.batching import padding_fraction, plan_batches
from core.checkpoint import TrainerState, latest_checkpoint, load_checkpoint
from core.config import Config, ConfigError, apply_override, config_from_dict, read_yaml
from core.distributed import SINGLE, Collective, DistributedError, init_distributed, shutdown_distributed
from core.errors import DuetError
from core.fingerprint import cache_root, folder_fingerprint, model_fingerprint, tokens_fingerprint
from core.metrics import ConsoleReporter, Event, MetricsLog, read_metrics, truncate_metrics
from core.model_card import model_card
from core.objectives import build_objective
from core.prepare import PreparedData, prepare_data
from core.progress import PhaseProgress
from core.reference import ReferenceLogps, load_or_compute, reference_key
from core.rundir import RunDirectory, RunDirError
from core.trainer import RunControl, TrainData, schedule_length, train

# Settings a resumed run may change: how long it goes on and how often it reports, not what it learns.
RESUME_OVERRIDABLE = (
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.save_every",
    "train.log_every",
    "train.keep_checkpoints",
    "train.nonfinite",
    "train.max_skipped_steps",
)


def demo_config_path() -> Path:
    from models.tiny_chat import CONFIG_FILE

    return CONFIG_FILE


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path | None
    final_metrics: dict[str, Any]
    state: TrainerState
    stopped: bool = False
    demo: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list, repr=False)


def resolve_config(config: Config | str | Path | dict | None, overrides: list[str] | tuple[str, ...]) -> Config:
    """A Config object, a YAML path, a dict, or None for the demo; overrides apply on top."""
    if isinstance(config, Config):
        if not overrides:
            return absolute_paths(copy.deepcopy(config).validate())
        data = config.to_dict()
    elif isinstance(config, dict):
        data = dict(config)
    else:
        data = read_yaml(demo_config_path() if config is None else config)
    for override in overrides:
        apply_override(data, override)
    return absolute_paths(config_from_dict(data).validate())


def absolute_paths(config: Config) -> Config:
    """Local paths become absolute, so the config saved in the run directory means the same from anywhere
    (a resume from another working directory). Hub ids and "demo" stay as they are."""

    def local(value: str | None) -> str | None:
        if value is None or value == "demo":
            return value
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value

    config.model.path = local(config.model.path) or config.model.path
    config.model.adapter = local(config.model.adapter)
    config.data.train = local(config.data.train) or config.data.train
    config.data.eval = local(config.data.eval)
    if config.data.chat_template not in ("auto", "plain", "chatml") and "{" not in config.data.chat_template:
        config.data.chat_template = local(config.data.chat_template) or config.data.chat_template
    config.train.output_dir = str(Path(config.train.output_dir).expanduser().resolve())
    if config.train.cache_dir:
        config.train.cache_dir = str(Path(config.train.cache_dir).expanduser().resolve())
    return config


class _Events:
    """Fans each event out to the sinks and remembers the latest train/eval metrics."""

    def __init__(self, sinks: list[Callable[[Event], None]]) -> None:
        self.sinks = sinks
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.history: list[Event] = []

    def __call__(self, event: Event) -> None:
        event.setdefault("time", time.time())
        if event["type"] == "train":
            self.last_train = event
        elif event["type"] == "eval":
            self.last_eval = event
        self.history.append(event)
        for sink in self.sinks:
            sink(event)

    def remember(self, events: list[Event]) -> None:
        """Take the latest train and eval metrics from events logged before a resume."""
        for event in events:
            if event.get("type") == "train":
                self.last_train = event
            elif event.get("type") == "eval":
                self.last_eval = event

    def final_metrics(self) -> dict[str, Any]:
        keep = lambda e: {k: v for k, v in e.items() if isinstance(v, (int, float)) and k not in ("time", "type")}  # noqa: E731
        return {**keep(self.last_train), **keep(self.last_eval)}


@contextlib.contextmanager
def _signals_stop(control: RunControl, say: Callable[[str], None], enabled: bool):
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save); a second one quits at once."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if control.stop_requested:
            raise KeyboardInterrupt
        control.request_stop(f"received {signal.Signals(signum).name}")
        say("stopping after this step and saving a checkpoint (Ctrl-C again quits at once; nothing is corrupted)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _references(
    backend,
    data: PreparedData,
    config: Config,
    run_dir: RunDirectory,
    resumed: bool,
    emit: Callable[[Event], None],
    pad_multiple: int,
    collective: Collective = SINGLE,
) -> tuple[ReferenceLogps | None, ReferenceLogps | None]:
    splits = {"train": data.train.tokenized, "eval": data.eval.tokenized if data.eval else []}
    stored = {name: run_dir.reference_dir / f"{name}.safetensors" for name in splits}
    if resumed and all(stored[n].is_file() for n, pairs in splits.items() if pairs):
        emit({"type": "reference", "message": f"reference log-probs: from the run directory {run_dir.reference_dir}"})
        return tuple(ReferenceLogps.from_file(stored[n]) if splits[n] else None for n in ("train", "eval"))  # type: ignore[return-value]
    start_adapter = config.model.adapter
    if resumed and start_adapter:
        raise DuetError(
            f"{run_dir.path}: the reference log-probs are missing from the run directory and this run "
            "started from an adapter, so they cannot be recomputed after training began."
        )
    cache = cache_root(config.train.cache_dir)
    model_fp = model_fingerprint(backend.model_location, backend.model_revision, cache)
    adapter_fp = folder_fingerprint(start_adapter, cache) if start_adapter else None
    if start_adapter:
        emit(
            {
                "type": "warning",
                "message": f"starting from the adapter {start_adapter}: the reference is the model "
                "with this adapter as loaded (computed before training), not the base model alone; the cache key "
                "includes the adapter.",
            }
        )
    results: dict[str, ReferenceLogps | None] = {}
    for name, pairs in splits.items():
        if not pairs:
            results[name] = None
            continue
        key = reference_key(model_fp, pairs, backend.info().dtype, adapter_fp)
        started = time.perf_counter()
        label = f"reference log-probs ({name})"
        progress = PhaseProgress(emit, "reference", label, len(collective.shard(pairs)))
        reference, hit = load_or_compute(
            backend,
            pairs,
            key,
            cache,
            batch_size=2 * config.train.batch_size,
            pad_id=data.chat.pad_id,
            adapter=bool(start_adapter),
            pad_to_multiple_of=pad_multiple,
            progress=progress,
            collective=collective,
        )
        where = cache / "reference" / f"{key}.safetensors"
        message = (
            f"reference log-probs ({name}, {len(pairs)} pairs): cache hit, reused {where}"
            if hit
            else f"reference log-probs ({name}, {len(pairs)} pairs): computed in "
            f"{time.perf_counter() - started:.1f}s, cached at {where}"
        )
        emit({"type": "reference", "split": name, "cache_hit": hit, "key": key, "message": message})
        if collective.is_main:
            run_dir.reference_dir.mkdir(exist_ok=True)
            write_safetensors(stored[name], reference.arrays())
        results[name] = reference
    return results["train"], results["eval"]


def run(
    config: Config | str | Path | dict | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    resume: str | Path | None = None,
    callback: Callable[[Event], None] | None = None,
    console: Console | None = None,
    control: RunControl | None = None,
    handle_signals: bool = True,
    on_ready: Callable[[Any, PreparedData], None] | None = None,
) -> RunResult:
    """Train as the config says; returns where the adapter is and the final metrics.

    ``callback`` gets every event; ``control`` pauses, stops or checkpoints the run from another thread;
    ``on_ready(backend, data)`` is called once the model and data are loaded (the TUI generates with them).
    """
    options = {
        "callback": callback,
        "console": console or Console(soft_wrap=True),
        "control": control or RunControl(),
        "handle_signals": handle_signals,
        "on_ready": on_ready,
    }
    if resume is None:
        cfg, run_dir = resolve_config(config, overrides), None
    else:
        run_dir = RunDirectory.open(resume)  # reads only; nothing is touched before the lock is held
        for override in overrides:
            key = override.partition("=")[0].strip()
            if key not in RESUME_OVERRIDABLE:
                raise ConfigError(
                    f"{key}: cannot change when resuming (it would change what the run learns); "
                    f"a resumed run may change {', '.join(RESUME_OVERRIDABLE)}."
                )
        cfg = run_dir.load_config(overrides)
    collective, device = init_distributed(cfg.model.device, cfg.train.distributed_timeout)
    try:
        if run_dir is None:
            return _new_run(cfg, collective, device, options)
        return _resumed_run(run_dir, cfg, bool(overrides), collective, device, options)
    finally:
        shutdown_distributed(collective)


def _new_run(cfg: Config, collective: Collective, device: str, options: dict[str, Any]) -> RunResult:
    backend, data, objective = _prepare(cfg, collective, device)
    run_dir = _shared_run_directory(cfg, data, collective)
    with run_dir.lock() if collective.is_main else contextlib.nullcontext():
        return _execute(run_dir, cfg, backend, data, objective, None, resumed=False, collective=collective, **options)


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
    run_dir: RunDirectory, cfg: Config, changed: bool, collective: Collective, device: str, options: dict[str, Any]
) -> RunResult:
    # the lock first: never clean up or read what another live run is writing
    with run_dir.lock() if collective.is_main else contextlib.nullcontext():
        if collective.is_main:
            run_dir.remove_stale_temporaries()
        collective.barrier()
        backend, data, objective = _prepare(cfg, collective, device)
        run_dir.check_fingerprints(_fingerprints(data))
        state = None
        checkpoint = latest_checkpoint(run_dir.path)
        if checkpoint is not None:
            backend.setup_optimizer(weight_decay=cfg.train.weight_decay)
            state = load_checkpoint(checkpoint, backend, run_dir.run_id, rank=collective.rank)
            _, total = schedule_length(len(data.train.tokenized), cfg, collective.world_size)
            if state.step >= total and run_dir.adapter_dir.is_dir():
                raise RunDirError(
                    f"{run_dir.path} finished all {state.step} steps; its adapter is in "
                    f"{run_dir.adapter_dir}. To train on, resume with train.max_steps above {state.step}."
                )
        if collective.is_main:
            truncate_metrics(run_dir.metrics_file, state.metrics_offset if state else 0)
            if changed:
                write_text(run_dir.config_file, cfg.to_yaml())
        collective.barrier()  # the metrics are cut back before any rank goes on
        return _execute(run_dir, cfg, backend, data, objective, state, resumed=True, collective=collective, **options)


def _prepare(cfg: Config, collective: Collective = SINGLE, device: str | None = None):
    """The backend with its model and LoRA, the tokenized data, the objective."""
    from app.backends import create_backend

    backend = create_backend(cfg, collective, device)
    backend.load_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    backend.seed(cfg.train.seed)  # the same LoRA initialization on every rank
    backend.attach_lora(cfg.lora, adapter_path=cfg.model.adapter)
    if collective.enabled:
        backend.seed(cfg.train.seed * 7919 + collective.rank)  # but each rank its own dropout masks
    data = prepare_data(cfg.data, backend.tokenizer, cfg.train.seed, cache_root(cfg.train.cache_dir))
    return backend, data, build_objective(cfg.objective)


def _fingerprints(data: PreparedData) -> dict[str, str]:
    prints = {"train": tokens_fingerprint(data.train.tokenized)}
    if data.eval is not None:
        prints["eval"] = tokens_fingerprint(data.eval.tokenized)
    return prints


def _execute(
    run_dir: RunDirectory,
    cfg: Config,
    backend,
    data: PreparedData,
    objective,
    state: TrainerState | None,
    *,
    resumed: bool,
    callback,
    console: Console,
    control: RunControl,
    handle_signals: bool,
    on_ready: Callable[[Any, PreparedData], None] | None,
    collective: Collective = SINGLE,
) -> RunResult:
    """Train and export inside a locked run directory, every event to metrics.jsonl, the console and ``callback``
    (under torchrun, rank 0 writes and reports; the other ranks train silently)."""
    if on_ready is not None:
        on_ready(backend, data)
    earlier = read_metrics(run_dir.metrics_file) if resumed else []  # what the run logged before this process
    metrics_log = MetricsLog(run_dir.metrics_file) if collective.is_main else None
    reporter = ConsoleReporter(console)
    sinks = [metrics_log, reporter] + ([callback] if callback else []) if collective.is_main else []
    emit = _Events(sinks)
    emit.remember(earlier)
    try:
        return _train_and_export(
            backend,
            cfg,
            data,
            objective,
            run_dir,
            state,
            emit,
            control,
            metrics_log,
            resumed=resumed,
            handle_signals=handle_signals,
            console=console,
            collective=collective,
        )
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            emit({"type": "error", "message": "interrupted; the newest checkpoint is intact"})
        else:
            emit(
                {"type": "error", "message": str(exc) if isinstance(exc, DuetError) else f"{type(exc).__name__}: {exc}"}
            )
        raise
    finally:
        reporter.close()
        if metrics_log is not None:
            metrics_log.close()


def data_warnings(data: PreparedData) -> list[str]:
    """What the user should know about the data before hours of training on it."""
    warnings = []
    for split in (data.train, data.eval):
        if split is None:
            continue
        load, tokens = split.load_report, split.tokenize_report
        if load.duplicates and not load.duplicates_dropped:
            warnings.append(
                f"{load.source}: {load.duplicates} duplicated pairs (e.g. {load.duplicate_examples[0]}) "
                "count twice in training; set data.drop_duplicates=true to keep one of each."
            )
        if load.skipped:
            warnings.append(
                f"{load.source}: skipped {load.skipped_total} invalid rows (data.skip_invalid); first: "
                f"{load.skipped_examples[0]}"
            )
        if tokens.dropped_no_response:
            warnings.append(
                f"{load.source}: {tokens.dropped_no_response} pairs dropped: their prompts leave no room "
                "for a reply within data.max_length."
            )
        warnings += [f"{load.source}: {w}" for w in tokens.warnings]
    return list(dict.fromkeys(warnings))  # eval split from train shares its reports: say each thing once


def padding_report(pairs: list, cfg: Config, pad_multiple: int) -> str:
    """One line on how much of the first epoch's batches is padding, and what length grouping saves."""
    lengths = [p.length for p in pairs]

    def padding(grouped: bool) -> float:
        plan = plan_batches(lengths, cfg.train.batch_size, seed=cfg.train.seed, group_by_length=grouped)
        return padding_fraction(pairs, plan, pad_multiple)

    if cfg.train.group_by_length:
        return f"padding: {padding(True):.1%} of the batches' token positions ({padding(False):.1%} without grouping)"
    return f"padding: {padding(False):.1%} of the batches' token positions (train.group_by_length is off)"


def _train_and_export(
    backend,
    cfg: Config,
    data: PreparedData,
    objective,
    run_dir: RunDirectory,
    state: TrainerState | None,
    emit: _Events,
    control: RunControl,
    metrics_log: MetricsLog | None,
    *,
    resumed: bool,
    handle_signals: bool,
    console: Console,
    collective: Collective = SINGLE,
) -> RunResult:
    for warning in [*backend.config_warnings, *data_warnings(data)]:
        emit({"type": "warning", "message": warning})
    if data.train.from_cache:
        emit({"type": "info", "message": f"tokenized pairs: reused from the cache ({data.train.load_report.source})"})
    _, total_steps = schedule_length(len(data.train.tokenized), cfg, collective.world_size)
    pad_multiple = getattr(backend, "pad_to_multiple_of", 1)
    emit({"type": "info", "message": padding_report(data.train.tokenized, cfg, pad_multiple)})
    train_ref, eval_ref = (
        (None, None)
        if objective.is_reference_free
        else _references(backend, data, cfg, run_dir, resumed, emit, pad_multiple, collective)
    )
    if state is None:
        backend.setup_optimizer(weight_decay=cfg.train.weight_decay)
        state = TrainerState(run_dir.run_id, total_steps, backend=backend.name)
    state.total_steps = total_steps
    info = backend.info()
    emit(
        {
            "type": "start",
            "run_dir": str(run_dir.path),
            "total_steps": total_steps,
            "start_step": state.step,
            "resumed": resumed,
            "backend": info.name,
            "device": info.device,
            "dtype": info.dtype,
            "objective": cfg.objective.name,
            "model": cfg.model.path,
            "train_pairs": len(data.train.tokenized),
            "eval_pairs": len(data.eval.tokenized) if data.eval else 0,
            "trainable_parameters": backend.trainable_parameters(),
            "total_parameters": backend.total_parameters(),
            "world_size": collective.world_size,
            "message": f"{'resuming' if resumed else 'training'} {cfg.objective.name} on {info.name} ({info.device}, "
            f"{info.dtype}{f', {collective.world_size} processes' if collective.enabled else ''}): "
            f"{len(data.train.tokenized)} pairs, {total_steps} steps, run {run_dir.path}",
        }
    )
    train_data = TrainData(
        data.train.tokenized,
        data.eval.tokenized if data.eval else [],
        train_ref,
        eval_ref,
        data.chat.pad_id,
        pad_multiple,
        collective,
    )
    with _signals_stop(control, lambda m: console.print(m, highlight=False), handle_signals):
        state = train(
            backend,
            objective,
            train_data,
            cfg,
            state,
            run_dir=run_dir.path,
            emit=emit,
            control=control,
            metrics_offset=metrics_log.offset if metrics_log else (lambda: 0),
        )
    final = emit.final_metrics()
    if state.step < state.total_steps:
        emit(
            {
                "type": "stopped",
                "step": state.step,
                "reason": control.reason,
                "message": f"stopped at step {state.step}/{state.total_steps} ({control.reason}); resume with: "
                f"python -m core.run --resume {run_dir.path}",
            }
        )
        return RunResult(run_dir.path, None, final, state, stopped=True, events=emit.history)
    if not collective.is_main:  # rank 0 exports; the adapters are the same on every rank
        # wait for the export: a rank that tears its process group down while another still uses it can
        # abort in gloo's teardown (seen as SIGABRT at exit)
        collective.barrier()
        return RunResult(run_dir.path, run_dir.adapter_dir, final, state, events=emit.history)

    with atomic_directory(run_dir.adapter_dir, replace=True) as folder:
        backend.save_adapter(folder)
        faults.reach("export.adapter")
        write_text(
            folder / "README.md",
            model_card(
                cfg,
                base_model=backend.model_location,
                data_fingerprint=tokens_fingerprint(data.train.tokenized),
                final_metrics=final,
                pairs=len(data.train.tokenized),
                steps=state.step,
                backend=backend.name,
            ),
        )
    collective.barrier()  # the other ranks wait for the export (above)
    demo = None
    if cfg.data.train == "demo" and data.eval:
        demo = _demo_report(backend, data, emit)
    emit(
        {
            "type": "end",
            "step": state.step,
            "adapter": str(run_dir.adapter_dir),
            "final": final,
            "message": f"done: the adapter is in {run_dir.adapter_dir}",
        }
    )
    return RunResult(run_dir.path, run_dir.adapter_dir, final, state, demo=demo, events=emit.history)


def _demo_report(backend, data: PreparedData, emit: _Events) -> dict[str, Any]:
    from models.tiny_chat import demo_report, unseen_prompts

    report = demo_report(backend, data.chat, [[{"role": "user", "content": p}] for p in unseen_prompts()])
    accuracy = emit.last_eval.get("eval_rewards/accuracies", float("nan"))
    emit(
        {
            "type": "info",
            "demo": report,
            "message": (
                f"demo: held-out reward accuracy {accuracy:.2f}; concise replies to {report['samples']} prompts "
                f"phrased unlike any training prompt (greedy): {report['base_concise']:.0%} before → "
                f"{report['tuned_concise']:.0%} after\n"
                f"  before: {report['base_examples']}\n  after:  {report['tuned_examples']}"
            ),
        }
    )
    return report


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
