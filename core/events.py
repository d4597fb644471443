"""A run's events, typed: what the trainer and the run emit, ``metrics.jsonl`` stores, the console prints, the
TUI draws and ``duet watch`` follows.

Each kind is a dataclass with a ``type`` (its name in ``metrics.jsonl``). `Event.to_json` gives the flat JSON
object written as one line (TRL's metric names at the top level: ``loss``, ``rewards/margins``,
``eval_rewards/accuracies``...); `event_from_json` reads such a line back into its class. Metric names contain
``/``, so they are read by key: ``event["rewards/margins"]`` or ``event.get(...)`` look in that JSON view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

FLATTEN = "flatten"  # a dict field whose entries are written at the top level (a step's metrics)
KEY = "key"  # the field's name in metrics.jsonl when it differs
PREFIX = "prefix"  # prepended to each flattened entry's name (eval_loss)
OMIT_NONE = "omit_none"  # a field left out of the line while unset (a warning that belongs to no step)


@dataclass(kw_only=True)
class Event:
    """What every event has: a one-line message for people (may be empty), the wall time it was emitted at,
    and whatever a newer writer added that this version does not know (kept, so nothing read is lost)."""

    type: ClassVar[str] = ""
    message: str = ""
    time: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for f in _own_fields(type(self)):
            value = getattr(self, f.name)
            if f.metadata.get(FLATTEN):
                prefix = f.metadata.get(PREFIX, "")
                out.update({prefix + k: v for k, v in value.items()})
            elif value is not None or not f.metadata.get(OMIT_NONE):
                out[f.metadata.get(KEY, f.name)] = value
        if self.message:
            out["message"] = self.message
        out.update(self.extra)
        if self.time is not None:
            out["time"] = self.time
        return out

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.to_json()


Callback = Callable[[Event], None]


def _own_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name not in ("message", "time", "extra")]


@dataclass(kw_only=True)
class RunStarted(Event):
    """Training is about to take its first step (or its first after a resume)."""

    type: ClassVar[str] = "start"
    run_dir: str = ""
    total_steps: int = 0
    start_step: int = 0
    resumed: bool = False
    backend: str = ""
    device: str = ""
    dtype: str = ""
    objective: str = ""
    model: str = ""
    train_pairs: int = 0
    eval_pairs: int = 0
    trainable_parameters: int = 0
    total_parameters: int = 0
    threads: int | None = None  # the CPU threads the backend runs on (None: a backend that does not say)
    world_size: int = 1


@dataclass(kw_only=True)
class ReferenceReady(Event):
    """The reference model's log-probs of a split are at hand: computed, or read from the cache or run."""

    type: ClassVar[str] = "reference"
    split: str | None = field(default=None, metadata={OMIT_NONE: True})
    cache_hit: bool | None = field(default=None, metadata={OMIT_NONE: True})
    key: str | None = field(default=None, metadata={OMIT_NONE: True})


@dataclass(kw_only=True)
class TrainStep(Event):
    """One optimizer step's metrics (TRL's names) and the batch's per-pair margins."""

    type: ClassVar[str] = "train"
    step: int
    total_steps: int
    epoch: float = 0.0
    metrics: dict[str, float | None] = field(default_factory=dict, metadata={FLATTEN: True})
    learning_rate: float = 0.0
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    pairs: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    eta: float | None = None
    margins: list[float] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class Evaluation(Event):
    """The held-out split's metrics at a step (written with TRL's ``eval_`` prefix) and each pair's margin."""

    type: ClassVar[str] = "eval"
    step: int
    metrics: dict[str, float | None] = field(default_factory=dict, metadata={FLATTEN: True, PREFIX: "eval_"})
    margins: list[float] = field(default_factory=list, metadata={KEY: "eval_margins"})
    pairs: int = field(default=0, metadata={KEY: "eval_pairs"})


@dataclass(kw_only=True)
class CheckpointSaved(Event):
    type: ClassVar[str] = "checkpoint"
    step: int
    path: str = ""


@dataclass(kw_only=True)
class Progress(Event):
    """How far a long phase (tokenizing, the reference pass, evaluation, generation) has got."""

    type: ClassVar[str] = "progress"
    phase: str = ""
    label: str = ""
    done: int
    total: int
    unit: str = "pairs"
    elapsed: float = 0.0
    eta: float | None = None

    @property
    def finished(self) -> bool:
        return self.done >= self.total


@dataclass(kw_only=True)
class RunWarning(Event):
    type: ClassVar[str] = "warning"
    step: int | None = field(default=None, metadata={OMIT_NONE: True})


@dataclass(kw_only=True)
class Info(Event):
    type: ClassVar[str] = "info"


@dataclass(kw_only=True)
class ThreadsChanged(Event):
    """The backend moved its CPU thread count after ``step`` (``model.threads=auto`` following other
    processes' load); a resumed run starts from the count in effect at its checkpoint."""

    type: ClassVar[str] = "threads"
    step: int = 0
    threads: int = 0


@dataclass(kw_only=True)
class DemoReport(Event):
    """The built-in demo's before/after: how often greedy replies to unseen prompts are concise."""

    type: ClassVar[str] = "demo"
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class SampleReplies(Event):
    """Held-out prompts answered greedily by the model before training (adapter off) and after (on)."""

    type: ClassVar[str] = "samples"
    rows: list[dict[str, str]] = field(default_factory=list)  # {"prompt", "before", "after"}


@dataclass(kw_only=True)
class RoundReport(Event):
    """A round of sample → judge → train → evaluate entered a phase, or ended with its held-out figures:
    the judge's win rate of this round's policy over the base and over the previous round's (wins plus half
    the ties, over the prompts judged), and for a score rule the mean score of its answers."""

    type: ClassVar[str] = "round"
    round: int
    rounds: int
    phase: str  # sample, train, evaluate, done
    step_offset: int = 0  # training steps of the earlier rounds (the dashboard's step axis runs on)
    pairs: int | None = None
    ties: int | None = None
    win_rate_vs_base: float | None = None
    win_rate_vs_previous: float | None = None
    mean_score: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Paused(Event):
    type: ClassVar[str] = "paused"
    step: int


@dataclass(kw_only=True)
class Resumed(Event):
    type: ClassVar[str] = "resumed"
    step: int


@dataclass(kw_only=True)
class Stopped(Event):
    """The run stopped early (a signal, the TUI's stop, a step limit) with a checkpoint to resume from."""

    type: ClassVar[str] = "stopped"
    step: int
    reason: str | None = None


@dataclass(kw_only=True)
class Finished(Event):
    type: ClassVar[str] = "end"
    step: int
    adapter: str = ""
    final: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class Failed(Event):
    type: ClassVar[str] = "error"


KINDS: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        RunStarted,
        ReferenceReady,
        TrainStep,
        Evaluation,
        CheckpointSaved,
        Progress,
        RunWarning,
        Info,
        ThreadsChanged,
        DemoReport,
        SampleReplies,
        RoundReport,
        Paused,
        Resumed,
        Stopped,
        Finished,
        Failed,
    )
}


def event_from_json(data: dict[str, Any]) -> Event | None:
    """The typed event of a ``metrics.jsonl`` line; None for a kind this version does not know or a line
    that lacks a field its kind requires (a reader skips it rather than fail on a newer or damaged file)."""
    cls = KINDS.get(data.get("type"))  # type: ignore[arg-type]
    if cls is None:
        return None
    rest = {k: v for k, v in data.items() if k not in ("type", "message", "time")}
    values: dict[str, Any] = {}
    flattened = None
    for f in _own_fields(cls):
        if f.metadata.get(FLATTEN):
            flattened = f
            continue
        key = f.metadata.get(KEY, f.name)
        if key in rest:
            values[f.name] = rest.pop(key)
    if flattened is not None:  # what no other field claimed is a metric (with the prefix, for eval)
        prefix = flattened.metadata.get(PREFIX, "")
        values[flattened.name] = {k.removeprefix(prefix): rest.pop(k) for k in list(rest) if k.startswith(prefix)}
    message = data.get("message")
    try:
        return cls(message="" if message is None else str(message), time=data.get("time"), extra=rest, **values)
    except TypeError:
        return None
