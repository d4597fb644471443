"""Modal dialogs: confirm, export, open/save a config path, and the "try it" panel."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, RadioButton, RadioSet, Static

from tui.session import TrainingSession


class ConfirmDialog(ModalScreen[bool]):
    """A yes/no question: Enter or y answers yes (the button focused), Escape or n no; the dialog says so."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,n", "no", "No"),
        Binding("y", "yes", "Yes", show=False),
    ]

    def __init__(self, question: str, yes: str = "Yes", no: str = "No") -> None:
        super().__init__()
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="question")
            with Horizontal(classes="buttons"):
                yield Button(self.yes, variant="error", id="yes")
                yield Button(self.no, variant="primary", id="no")
            yield Static(f"Enter or y: {self.yes}   ·   Esc or n: {self.no}", classes="keys")

    def on_mount(self) -> None:
        self.query_one("#yes", Button).focus()

    @on(Button.Pressed, "#yes")
    def action_yes(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#no")
    def action_no(self) -> None:
        self.dismiss(False)


class PathDialog(ModalScreen[str | None]):
    """Ask for a file path (open or save a config)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "", action: str = "OK") -> None:
        super().__init__()
        self.title_text, self.value, self.action_label = title, value, action

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text)
            yield Input(self.value, id="path")
            with Horizontal(classes="buttons"):
                yield Button(self.action_label, variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def accept(self) -> None:
        value = self.query_one("#path", Input).value.strip()
        self.dismiss(value or None)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class ExportDialog(ModalScreen[Path | None]):
    """Export the run's adapter (or its newest checkpoint) as PEFT, MLX or a merged model."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, source: Path) -> None:
        super().__init__()
        self.source = source  # the run directory (or an adapter folder): exports go inside it by default

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Export {self.source.name}")
            with RadioSet(id="format"):
                yield RadioButton("PEFT adapter (transformers / peft)", value=True, id="peft")
                yield RadioButton("MLX adapter (mlx-lm)", id="mlx")
                yield RadioButton("merged model (full weights)", id="merged")
            yield Input(str(free_folder(self.source / "export-peft")), id="out")
            yield Checkbox("replace the folder if it is not empty", id="force")
            yield Static("", id="export-status")
            with Horizontal(classes="buttons"):
                yield Button("Export", variant="primary", id="go")
                yield Button("Cancel", id="cancel")

    @on(RadioSet.Changed)
    def suggest_folder(self, event: RadioSet.Changed) -> None:
        out = self.query_one("#out", Input)
        current = Path(out.value)
        if current.name.startswith("export-"):
            out.value = str(free_folder(current.parent / f"export-{event.pressed.id}"))

    @on(Button.Pressed, "#go")
    def go(self) -> None:
        pressed = self.query_one("#format", RadioSet).pressed_button
        target = pressed.id if pressed is not None else "peft"
        out = Path(self.query_one("#out", Input).value.strip()).expanduser()
        force = self.query_one("#force", Checkbox).value
        if out.exists() and any(out.iterdir()) and not force:
            self.query_one("#export-status", Static).update(
                Text(f"{out} exists and is not empty: tick 'replace' to overwrite it.", style="bold red")
            )
            return
        self.query_one("#export-status", Static).update("exporting…")
        self.query_one("#go", Button).disabled = True
        self.export(target, out, force)

    @work(thread=True, exclusive=True)
    def export(self, target: str, out: Path, force: bool) -> None:
        from app.api import DuetError, export

        try:
            written = export(self.source, target, out, force=force)
        except DuetError as exc:
            self.app.call_from_thread(self._failed, str(exc))
            return
        self.app.call_from_thread(self.dismiss, written)

    def _failed(self, message: str) -> None:
        self.query_one("#export-status", Static).update(Text(message, style="bold red"))
        self.query_one("#go", Button).disabled = False

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


def free_folder(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ...: the first that does not exist or is empty."""
    candidate, number = path, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


class TryItPanel(ModalScreen[None]):
    """Type a prompt; see the base model's and the tuned model's replies side by side."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]

    def __init__(self, session: TrainingSession) -> None:
        super().__init__()
        self.session = session

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("Try it: a prompt, answered with the adapter off (base) and on (tuned)")
            yield Input(placeholder="Type a prompt and press Enter", id="prompt")
            with Grid(id="replies"):
                with VerticalScroll():
                    yield Label("base", classes="reply-title")
                    yield Static("", id="base")
                with VerticalScroll():
                    yield Label("tuned", classes="reply-title")
                    yield Static("", id="tuned")
            yield Button("Close", id="close")

    @on(Input.Submitted, "#prompt")
    def ask(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            return
        if not self.session.can_generate:  # the dashboard offers "try it" only with a model; this is a safeguard
            self.query_one("#base", Static).update("no model is loaded (the run ended before it loaded one)")
            return
        for pane in ("#base", "#tuned"):
            self.query_one(pane, Static).update(Text("generating…", style="italic"))
        self.generate(event.value.strip())

    @work(thread=True, exclusive=True)
    def generate(self, prompt: str) -> None:
        for pane, adapter in (("#base", False), ("#tuned", True)):
            try:
                reply = self.session.generate(prompt, adapter=adapter)
            except Exception as exc:  # shown in the pane: generation failing must not take the app down
                reply = f"(generation failed: {type(exc).__name__}: {exc})"
            self.app.call_from_thread(self.query_one(pane, Static).update, reply or "(empty reply)")

    @on(Button.Pressed, "#close")
    def action_close(self) -> None:
        self.dismiss(None)
