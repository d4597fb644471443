"""The set-up screen: model, data (checked), objective and its hyperparameters, LoRA, training, backend.

The form edits the same YAML config the headless run takes: values become dotted overrides on a base
config (the demo's, or a file opened here), validated by the same code, saved as the same YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Footer, Input, Select, Static

from app.api import OBJECTIVES, Config, DuetError, backend_names, config_from_dict


def objective_help(name: str) -> str:
    """The objective's own one-line summary, with its default β (from its declaration)."""
    declared = OBJECTIVES[name]
    summary = declared.summary[0].upper() + declared.summary[1:]
    return summary + (f"; default β {declared.default_beta}." if declared.default_beta is not None else ".")


def default_beta(name: str) -> float:
    return OBJECTIVES[name].default_beta or 0.0


def beta_placeholder(name: str) -> str:
    default = OBJECTIVES[name].default_beta
    return "no β: leave empty" if default is None else f"default {default}"


@dataclass(frozen=True)
class Field:
    key: str  # dotted config key
    label: str
    help: str = ""
    choices: tuple[str, ...] = ()  # a Select when set
    optional: bool = False  # empty means "the default"


FIELDS = (
    Field("model.path", "Model", "folder, .gguf, hub id, or name"),
    Field("data.train", "Data", "file, folder, hub id, or demo"),
    Field("data.skip_invalid", "Skip bad rows", "true: skip and count bad rows", choices=("false", "true")),
    Field("data.eval_fraction", "Eval fraction", "share held out for evaluation"),
    Field("data.max_length", "Max length", "tokens: prompt + reply"),
    Field("data.max_prompt_length", "Max prompt", "prompt tokens kept (the end)", optional=True),
    Field("data.unpaired", "Pairs → rated", "KTO: split pairs into good/bad", choices=("false", "true")),
    Field("objective.name", "Objective", "", choices=tuple(OBJECTIVES)),  # every declared objective
    Field("objective.beta", "β", "empty: the objective's default", optional=True),
    Field("objective.gamma_beta_ratio", "γ/β (SimPO)", "SimPO's margin relative to β", optional=True),
    Field("objective.label_smoothing", "Label smoothing", "share of flipped labels (cDPO)"),
    Field("objective.nll_weight", "NLL weight", "NLL on chosen replies (RPO)"),
    Field("objective.desirable_weight", "λ_D (KTO)", "weight of desirable examples", optional=True),
    Field("objective.undesirable_weight", "λ_U (KTO)", "weight of undesirable examples", optional=True),
    Field("lora.rank", "LoRA rank"),
    Field("lora.alpha", "LoRA alpha"),
    Field("lora.dropout", "LoRA dropout"),
    Field("train.max_steps", "Max steps", "empty: train for Epochs", optional=True),
    Field("train.epochs", "Epochs"),
    Field("train.lr", "Learning rate"),
    Field("train.batch_size", "Batch (pairs)"),
    Field("train.grad_accum", "Grad accumulation"),
    Field("model.backend", "Backend", "", choices=("auto", *backend_names())),  # the registered backends
    Field(
        "model.dtype", "Precision", "auto: GPU bf16/fp16, else fp32", choices=("auto", "float32", "bfloat16", "float16")
    ),
    Field("model.gradient_checkpointing", "Recompute", "true: less memory, slower steps", choices=("false", "true")),
    Field("train.output_dir", "Output folder", "run folders go here"),
    Field("train.run_name", "Run name", "empty: date and time", optional=True),
)


def field_id(key: str) -> str:
    return "f-" + key.replace(".", "-")


def get(config: dict[str, Any], key: str) -> Any:
    section, name = key.split(".")
    return config[section][name]


def model_names() -> SuggestFromList:
    """Typing the start of a recommended model's name offers the rest (→ takes it)."""
    from app.api import RECOMMENDED

    return SuggestFromList(list(RECOMMENDED), case_sensitive=False)


def models_note() -> str:
    from app.api import RECOMMENDED, availability

    names = [name if availability(m) == "ready" else f"{name} (not installed)" for name, m in RECOMMENDED.items()]
    return "recommended: " + ", ".join(names)


def backend_note() -> str:
    from app.api import mlx_report, resolve_backend_name, torch_report

    chosen = resolve_backend_name("auto")
    torch_info, mlx_info = torch_report(), mlx_report()
    devices = ", ".join(torch_info.get("devices", [])) if torch_info["usable"] else "unavailable"
    mlx_text = mlx_info.get("device", "") if mlx_info["usable"] else "unavailable"
    return f"auto → {chosen}   (torch: {devices}; mlx: {mlx_text})"


class SetupScreen(Screen):
    BINDINGS: ClassVar[list[BindingType]] = [
        # function keys and ctrl+s/o: an Input keeps most ctrl keys for editing
        Binding("f5", "start", "Start"),
        Binding("f2", "check_data", "Check data"),
        Binding("f3", "inspect", "Inspect"),
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+o", "open", "Open"),
        Binding("q", "quit", "Quit", show=False),  # when no text field has the focus; the footer shows ctrl+q
    ]

    def __init__(self, config: Config, source: str = "the demo") -> None:
        super().__init__()
        self.base = config.to_dict()
        self.source = source

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="form"):
            yield Static(Text.assemble(("Duet", "bold"), f" — settings from {self.source}"), id="source")
            for field in FIELDS:
                value = get(self.base, field.key)
                with Horizontal(classes="field"):
                    yield Static(field.label, classes="field-label")
                    # compact widgets: one line a field, so the form fits 80×24 with little scrolling
                    if field.choices:
                        value = str(value).lower() if isinstance(value, bool) else value
                        options = [(c, c) for c in field.choices]
                        yield Select(options, value=value, allow_blank=False, id=field_id(field.key), compact=True)
                    else:
                        text = "" if value is None else str(value)
                        yield Input(
                            text,
                            placeholder=self._placeholder(field),
                            id=field_id(field.key),
                            compact=True,
                            suggester=model_names() if field.key == "model.path" else None,
                        )
                    yield Static(field.help, classes="field-help")
                if field.key == "objective.name":
                    yield Static(objective_help(value), id="objective-help")
                if field.key == "model.path":
                    yield Static(models_note(), id="models-note")
                if field.key == "model.backend":
                    yield Static(backend_note(), id="backend-note")
                if field.key == "data.train":
                    yield Static("", id="data-report")
            yield Static("", id="errors")
            with Horizontal(classes="buttons"):
                yield Button("Start training", variant="success", id="start", compact=True)
                yield Button("Check data", id="check", compact=True)
                yield Button("Inspect", id="inspect", compact=True)
                yield Button("Save", id="save", compact=True)
                yield Button("Open", id="open", compact=True)
        yield Footer()

    def _placeholder(self, field: Field) -> str:
        if field.key == "objective.beta":
            return beta_placeholder(get(self.base, "objective.name"))
        return "default" if field.optional else ""

    # -- form ↔ config --------------------------------------------------------------------------------

    def overrides(self) -> list[str]:
        values = []
        for field in FIELDS:
            widget = self.query_one(f"#{field_id(field.key)}")
            value = widget.value
            if isinstance(widget, Input):
                value = value.strip()
                if not value:
                    values.append(f"{field.key}=null" if field.optional else f"{field.key}=")
                    continue
            values.append(f"{field.key}={value}")
        return values

    def current_config(self) -> Config | None:
        """The form as a validated Config, or None with the error shown."""
        from app.api import absolute_paths, apply_override

        data = yaml.safe_load(yaml.safe_dump(self.base))
        try:
            for override in self.overrides():
                apply_override(data, override)
            config = absolute_paths(config_from_dict(data).validate())
        except DuetError as exc:
            self.query_one("#errors", Static).update(Text(str(exc), style="bold red"))
            return None
        self.query_one("#errors", Static).update("")
        return config

    @on(Select.Changed, f"#{field_id('objective.name')}")
    def objective_changed(self, event: Select.Changed) -> None:
        name = str(event.value)
        self.query_one("#objective-help", Static).update(objective_help(name))
        previous = self.base["objective"]["name"]
        if name == previous:
            return
        self.base["objective"]["name"] = name
        beta = self.query_one(f"#{field_id('objective.beta')}", Input)
        beta.placeholder = beta_placeholder(name)
        try:
            typed = float(beta.value) != default_beta(previous)
        except ValueError:
            typed = bool(beta.value.strip())  # not a number: the user's to fix, not ours to clear
        # empty, or the previous objective's default: the new objective's default applies; none for one without β
        if not typed or OBJECTIVES[name].default_beta is None:
            beta.value = ""

    # -- actions ----------------------------------------------------------------------------------------

    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        from tui.dashboard import DashboardScreen
        from tui.session import TrainingSession

        config = self.current_config()
        if config is not None:
            self.app.switch_screen(DashboardScreen(session=TrainingSession(config)))

    @on(Button.Pressed, "#check")
    def action_check_data(self) -> None:
        config = self.current_config()
        if config is not None:
            self.query_one("#data-report", Static).update(Text("checking…", style="italic"))
            self.check_data(config)

    @work(thread=True, exclusive=True, group="check")
    def check_data(self, config: Config) -> None:
        from app.api import load_preferences, resolve_data_source

        data = config.data
        try:
            _, report = load_preferences(
                resolve_data_source(data.train),
                format=data.format,
                columns=data.columns,
                split=data.split,
                skip_invalid=data.skip_invalid,  # the rule training will apply (F5)
            )
            text = Text("\n".join(report.summary_lines()), style="yellow" if report.skipped else "green")
        except DuetError as exc:
            hint = "" if data.skip_invalid else "\nOn this screen: set 'Skip bad rows' to true to skip such rows."
            text = Text(str(exc) + hint, style="bold red")
        self.app.call_from_thread(self.query_one("#data-report", Static).update, text)

    @on(Button.Pressed, "#inspect")
    def action_inspect(self) -> None:
        from tui.inspect_view import InspectScreen

        config = self.current_config()
        if config is not None:
            self.app.push_screen(InspectScreen(config))

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        from tui.dialogs import PathDialog

        config = self.current_config()
        if config is None:
            return

        def save(path: str | None) -> None:
            if not path:
                return
            from app.api import DiskError, write_text

            try:
                write_text(Path(path).expanduser(), config.to_yaml())
            except DiskError as exc:
                self.notify(str(exc), severity="error")
                return
            self.notify(f"saved {path}; train it headless with: python -m core.run --config {path}")

        self.app.push_screen(PathDialog("Save the config as", "duet-run.yaml", "Save"), save)

    @on(Button.Pressed, "#open")
    def action_open(self) -> None:
        from tui.dialogs import PathDialog

        def load(path: str | None) -> None:
            if not path:
                return
            from app.api import load_config

            try:
                config = load_config(path)
            except DuetError as exc:
                self.notify(str(exc), severity="error", timeout=8)
                return
            self.app.switch_screen(SetupScreen(config, source=path))

        self.app.push_screen(PathDialog("Open a config file", "duet-run.yaml", "Open"), load)

    def action_quit(self) -> None:
        self.app.exit()
