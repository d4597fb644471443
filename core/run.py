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

from core.atomic import atomic_directory, write_safetensors, write_text
from core.checkpoint import TrainerState, latest_checkpoint, load_checkpoint
from core.config import Config, ConfigError, apply_override, config_from_dict, read_yaml
from core.errors import DuetError
from core.fingerprint import cache_root, folder_fingerprint, model_fingerprint, tokens_fingerprint
from core.metrics import ConsoleReporter, Event, MetricsLog, truncate_metrics
from core.model_card import model_card
from core.objectives import build_objective
from core.prepare import PreparedData, prepare_data
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
        reference, hit = load_or_compute(
            backend,
            pairs,
            key,
            cache,
            batch_size=2 * config.train.batch_size,
            pad_id=data.chat.pad_id,
            adapter=bool(start_adapter),
            pad_to_multiple_of=pad_multiple,
        )
        where = cache / "reference" / f"{key}.safetensors"
        message = (
            f"reference log-probs ({name}, {len(pairs)} pairs): cache hit, reused {where}"
            if hit
            else f"reference log-probs ({name}, {len(pairs)} pairs): computed in "
            f"{time.perf_counter() - started:.1f}s, cached at {where}"
        )
        emit({"type": "reference", "split": name, "cache_hit": hit, "key": key, "message": message})
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
        cfg = resolve_config(config, overrides)
        backend, data, objective = _prepare(cfg)
        run_dir = RunDirectory.create(cfg, fingerprints=_fingerprints(data))
        with run_dir.lock():
            return _execute(run_dir, cfg, backend, data, objective, None, resumed=False, **options)

    run_dir = RunDirectory.open(resume)
    with run_dir.lock():  # before anything else: never clean up or read what another live run is writing
        run_dir.remove_stale_temporaries()
        for override in overrides:
            key = override.partition("=")[0].strip()
            if key not in RESUME_OVERRIDABLE:
                raise ConfigError(
                    f"{key}: cannot change when resuming (it would change what the run learns); "
                    f"a resumed run may change {', '.join(RESUME_OVERRIDABLE)}."
                )
        cfg = run_dir.load_config(overrides)
        backend, data, objective = _prepare(cfg)
        run_dir.check_fingerprints(_fingerprints(data))
        state = None
        checkpoint = latest_checkpoint(run_dir.path)
        if checkpoint is not None:
            backend.setup_optimizer(weight_decay=cfg.train.weight_decay)
            state = load_checkpoint(checkpoint, backend, run_dir.run_id)
            _, total = schedule_length(len(data.train.tokenized), cfg)
            if state.step >= total:
                raise RunDirError(
                    f"{run_dir.path} finished all {state.step} steps; its adapter is in "
                    f"{run_dir.adapter_dir}. To train on, resume with train.max_steps above {state.step}."
                )
        truncate_metrics(run_dir.metrics_file, state.metrics_offset if state else 0)
        if overrides:
            write_text(run_dir.config_file, cfg.to_yaml())
        return _execute(run_dir, cfg, backend, data, objective, state, resumed=True, **options)


def _prepare(cfg: Config):
    """The backend with its model and LoRA, the tokenized data, the objective."""
    from backends.base import create_backend

    backend = create_backend(cfg)
    backend.load_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    backend.seed(cfg.train.seed)
    backend.attach_lora(cfg.lora, adapter_path=cfg.model.adapter)
    data = prepare_data(cfg.data, backend.tokenizer, cfg.train.seed)
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
) -> RunResult:
    """Train and export inside a locked run directory, every event to metrics.jsonl, the console and ``callback``."""
    if on_ready is not None:
        on_ready(backend, data)
    metrics_log = MetricsLog(run_dir.metrics_file)
    reporter = ConsoleReporter(console)
    emit = _Events([metrics_log, reporter] + ([callback] if callback else []))
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
        metrics_log.close()


def _train_and_export(
    backend,
    cfg: Config,
    data: PreparedData,
    objective,
    run_dir: RunDirectory,
    state: TrainerState | None,
    emit: _Events,
    control: RunControl,
    metrics_log: MetricsLog,
    *,
    resumed: bool,
    handle_signals: bool,
    console: Console,
) -> RunResult:
    _, total_steps = schedule_length(len(data.train.tokenized), cfg)
    pad_multiple = getattr(backend, "pad_to_multiple_of", 1)
    train_ref, eval_ref = (
        (None, None)
        if objective.is_reference_free
        else _references(backend, data, cfg, run_dir, resumed, emit, pad_multiple)
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
            "message": f"{'resuming' if resumed else 'training'} {cfg.objective.name} on {info.name} ({info.device}, "
            f"{info.dtype}): {len(data.train.tokenized)} pairs, {total_steps} steps, run {run_dir.path}",
        }
    )
    train_data = TrainData(
        data.train.tokenized,
        data.eval.tokenized if data.eval else [],
        train_ref,
        eval_ref,
        data.chat.pad_id,
        pad_multiple,
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
            metrics_offset=metrics_log.offset,
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

    with atomic_directory(run_dir.adapter_dir, replace=True) as folder:
        backend.save_adapter(folder)
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
    parser = argparse.ArgumentParser(
        prog="python -m core.run",
        description="Train a LoRA adapter with a preference objective (no arguments: the built-in demo).",
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
