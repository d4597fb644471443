"""Duet's public API: what the TUI, the bench and other front ends use, so they never reach into the library
or a backend. Every name here is a stable entry point; the modules behind it may move.

- models: `resolve_model` (a folder, hub id, registry name or .gguf file → a model folder)
- prepare and inspect: `load_config`, `config_from_dict`, `apply_override`, `resolve_config`,
  `absolute_paths`, `resolve_data_source`, `load_preferences`, `inspect_data`
- train: `run` (a whole run: data, reference, training, export), `RunControl` (pause, stop, save now)
- evaluate: `evaluate` (duet eval: tuned vs base, the report in RUN/eval), `compare`, `read_report`,
  `render_markdown`, `open_blind_session` (a person's blind A/B in the Collect screen)
- export: `export` (a folder: peft, mlx, merged; or a .gguf file), `EXPORT_FORMATS`
- models: `RECOMMENDED` (the registry: usable by name offline), `availability`
- backends and objectives: `backend_names`, `resolve_backend_name`, `create_backend`, `OBJECTIVES`,
  `build_objective`
- events: the typed events of `core.events`, `read_events` / `parse_events` (metrics.jsonl)
"""

from __future__ import annotations

from app.backends import backend_names, create_backend, resolve_backend_name
from app.blind import BLIND_FILE, open_blind_session
from app.collect import Answers, CollectSession, Tally, open_session, train_config_for
from app.doctor import mlx_report, torch_report
from app.evaluate import EvalError, EvalResult, compare, evaluate
from app.exports import FORMATS as EXPORT_FORMATS
from app.exports import export
from app.run import RunResult, run
from app.settings import absolute_paths, resolve_config
from core.atomic import DiskError, write_text
from core.collect import read_prompts
from core.config import Config, apply_override, config_from_dict, load_config
from core.data import load_preferences
from core.errors import DuetError
from core.evaluation.report import read_report, render_markdown
from core.events import (
    CheckpointSaved,
    DemoReport,
    Evaluation,
    Event,
    Failed,
    Finished,
    Info,
    Paused,
    Progress,
    ReferenceReady,
    Resumed,
    RoundReport,
    RunStarted,
    RunWarning,
    SampleReplies,
    Stopped,
    TrainStep,
)
from core.inspection import inspect_data, render_pair, summary
from core.metrics import format_duration
from core.metrics import parse_lines as parse_events
from core.metrics import read_metrics as read_events
from core.models_io import load_tokenizer
from core.models_io import resolve_model_path as resolve_model
from core.objectives import OBJECTIVES, build_objective
from core.prepare import resolve_data_source
from core.rundir import LOCK_FILE, METRICS_FILE, RunDirectory
from core.tokenization import ChatTokenizer
from core.trainer import RunControl
from models.registry import RECOMMENDED, availability

__all__ = [
    "BLIND_FILE",
    "EXPORT_FORMATS",
    "LOCK_FILE",
    "METRICS_FILE",
    "OBJECTIVES",
    "RECOMMENDED",
    "Answers",
    "ChatTokenizer",
    "CheckpointSaved",
    "CollectSession",
    "Config",
    "DemoReport",
    "DiskError",
    "DuetError",
    "EvalError",
    "EvalResult",
    "Evaluation",
    "Event",
    "Failed",
    "Finished",
    "Info",
    "Paused",
    "Progress",
    "ReferenceReady",
    "Resumed",
    "RoundReport",
    "RunControl",
    "RunDirectory",
    "RunResult",
    "RunStarted",
    "RunWarning",
    "SampleReplies",
    "Stopped",
    "Tally",
    "TrainStep",
    "absolute_paths",
    "apply_override",
    "availability",
    "backend_names",
    "build_objective",
    "compare",
    "config_from_dict",
    "create_backend",
    "evaluate",
    "export",
    "format_duration",
    "inspect_data",
    "load_config",
    "load_preferences",
    "load_tokenizer",
    "mlx_report",
    "open_blind_session",
    "open_session",
    "parse_events",
    "read_events",
    "read_prompts",
    "read_report",
    "render_markdown",
    "render_pair",
    "resolve_backend_name",
    "resolve_config",
    "resolve_data_source",
    "resolve_model",
    "run",
    "summary",
    "torch_report",
    "train_config_for",
    "write_text",
]
