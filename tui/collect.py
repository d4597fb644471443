"""The Collect screen: two answers from the user's model side by side, the person's verdict on each pair,
every verdict appended at once to the judgements file (``duet collect PROMPTS --out FILE``). With
``--thumbs``, the Thumbs screen: one answer at a time, rated thumbs up or down (unpaired feedback, for KTO).

The model loads in a thread worker and the answers are generated in the session's own background thread;
the UI thread only reads what has streamed in (at most ``REFRESH_HZ`` times a second) and calls the
session's quick methods, which touch the file and the queue but never wait on the backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widget import Widget
from textual.widgets import Button, Input, Label, Static, TextArea

from app.api import Answers, CollectSession, Config, DuetError, open_session, train_config_for

REFRESH_HZ = 20  # streamed tokens arrive far faster; the panes need not redraw more often than this
PANES = ("left", "right")
ALL_JUDGED = "all prompts judged — T to train on them, p to add a prompt, q to quit"


def generated_side(answers: Answers, pane: str) -> str:
    """The answer ("a" or "b", as generated) that ``pane`` shows: the sides are shuffled per pair so that
    the position on screen cannot bias the verdict."""
    other = "b" if answers.left == "a" else "a"
    return answers.left if pane == "left" else other


def pane_text(answers: Answers, pane: str) -> str:
    return answers.texts[0 if generated_side(answers, pane) == "a" else 1]


class SessionOpened(Message):
    def __init__(self, session: CollectSession) -> None:
        super().__init__()
        self.session = session


class SessionFailed(Message):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message


class KeyLegend(Widget):
    """The screen's keys, wrapped onto as many lines as the width needs: a footer that cuts nothing at 80
    columns (Textual's Footer is one line, and these keys take two)."""

    DEFAULT_CSS = """
    KeyLegend {
        height: auto;
        padding: 0 0 0 1;  /* every column for the keys: they fit two lines at 80 columns */
        background: $footer-background;
        color: $footer-description-foreground;
    }
    """

    def __init__(self, keys: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keys = keys

    def lines(self, width: int) -> list[Text]:
        lines: list[Text] = [Text()]
        for key, description in self.keys:
            item = Text.assemble((key, "bold"), " ", description)
            gap = 2 if lines[-1].cell_len else 0
            if lines[-1].cell_len and lines[-1].cell_len + gap + item.cell_len > width:
                lines.append(Text())
                gap = 0
            lines[-1].append(" " * gap)
            lines[-1].append_text(item)
        return lines

    def get_content_height(self, container: Any, viewport: Any, width: int) -> int:
        return len(self.lines(width))

    def render(self) -> Text:
        return Text("\n").join(self.lines(max(self.content_size.width, 1)))


class AnswerPane(VerticalScroll, can_focus=False):
    """One answer, wrapped and scrollable; not focusable, so ← and → stay the judgement keys."""


class EditDialog(ModalScreen[str | None]):
    """Edit an answer; saved, the edit is recorded as chosen over the other answer."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "save", "Save", priority=True),  # priority: the text area keeps most keys
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, pane: str, text: str, title: str | None = None) -> None:
        super().__init__()
        self.pane, self.text = pane, text
        other = "right" if pane == "left" else "left"
        self.title_text = title or f"Edit the {pane} answer: saved, it is chosen over the {other} one"

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(self.title_text)
            yield TextArea(self.text, id="edited", soft_wrap=True)
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save", compact=True)
                yield Button("Cancel", id="cancel", compact=True)
            yield Static("ctrl+s: save   ·   Esc: cancel", classes="keys")

    def on_mount(self) -> None:
        area = self.query_one(TextArea)
        area.move_cursor(area.document.end)  # an answer is most often fixed or finished at its end
        area.focus()

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        # ctrl+s is a priority key, handled before the text area's queue: keys typed just before it (fast
        # typing, a paste) may still wait there, so the text is read after them
        self.query_one(TextArea).call_later(self._save)

    def _save(self) -> None:
        text = self.query_one(TextArea).text
        if not text.strip():
            self.notify("the edited answer is empty: write one, or Esc to cancel", severity="warning")
            return
        self.dismiss(text)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class PromptDialog(ModalScreen[str | None]):
    """Type a prompt of one's own: it is answered and judged next."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("A new prompt (judged next)")
            yield Input(placeholder="Type a prompt and press Enter", id="new-prompt")
            yield Static("Enter: add   ·   Esc: cancel", classes="keys")

    @on(Input.Submitted)
    def accept(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class CollectScreen(Screen):
    BINDINGS: ClassVar[list[BindingType]] = [
        # priority: a key a child might claim (← → scroll a container) is a verdict here
        Binding("1,left", "pick('left')", "left better", key_display="1/←", priority=True),
        Binding("2,right", "pick('right')", "right better", key_display="2/→", priority=True),
        Binding("t", "verdict('tie')", "tie"),
        Binding("x", "verdict('both_bad')", "both bad"),
        Binding("e", "edit('left')", "edit left/right", key_display="e/E"),  # one legend item: two lines at 80
        Binding("E", "edit('right')", "edit right", show=False),
        Binding("r", "regenerate", "regenerate"),
        Binding("s", "skip", "skip"),
        Binding("u", "undo", "undo"),
        Binding("p", "add_prompt", "new prompt"),
        Binding("T", "train", "train on these", key_display="T"),
        Binding("up", "scroll(-1)", "scroll", key_display="↑↓"),
        Binding("down", "scroll(1)", "scroll", show=False),
        Binding("pageup", "scroll(-10)", "page up", show=False),
        Binding("pagedown", "scroll(10)", "page down", show=False),
        Binding("q", "quit", "quit"),
    ]
    # What a screen on the same session says where the keys it offers differ (the blind A/B has no r, p, T),
    # and whether answers show while they stream (the blind A/B waits: the side that streams first is the
    # model generated first, which would give away which is which).
    ALL_JUDGED: ClassVar[str] = ALL_JUDGED
    ALL_JUDGED_HINT: ClassVar[str] = "every prompt is judged: p adds one, T trains on them"
    RETRY_HINT: ClassVar[str] = "r tries again, s skips"
    STREAMING: ClassVar[bool] = True
    PANES: ClassVar[tuple[str, ...]] = PANES  # the answer panes, by id prefix
    READY: ClassVar[str] = "both answers ready: which is better?"

    def __init__(self, config: Config, prompts: str | None, out: str | Path) -> None:
        super().__init__()
        self.config, self.prompts, self.out = config, prompts, Path(out)
        self.session: CollectSession | None = None
        self.failure: str | None = None
        self.updates = 0  # streamed updates received (the tests check generation ran while keys were pressed)
        self._dirty = False  # set from the generation thread; the UI thread redraws on its own clock
        self._gone = False  # not `_closed`: Textual's message pump has its own, and setting it early hangs the app

    # -- layout -----------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="collect-prompt"):
            yield Static(Text(self.loading_text(), style="italic"), id="prompt-text")
        with Horizontal(id="answers"):
            for pane in self.PANES:
                with AnswerPane(id=f"{pane}-pane", classes="answer"):
                    yield Static("", id=f"{pane}-text", markup=False)
        yield Static(Text("loading the model…", style="italic"), id="collect-status")
        yield Static("", id="tally")
        keys = [(b.key_display or b.key, b.description) for b in self.BINDINGS if isinstance(b, Binding) and b.show]
        yield KeyLegend(keys, id="legend")

    def loading_text(self) -> str:
        model = self.config.model
        return f"loading {model.path}" + (f" with the adapter {model.adapter}" if model.adapter else "") + "…"

    def on_mount(self) -> None:
        for pane in self.PANES:
            self.query_one(f"#{pane}-pane").border_title = self.pane_title(pane)
        self.run_worker(self._open, thread=True, name="collect-open", exit_on_error=False)
        self.set_interval(1 / REFRESH_HZ, self._sync)

    def on_unmount(self) -> None:
        self._gone = True
        if self.session is not None:
            self.session.close()

    # -- the session, off the UI thread -----------------------------------------------------------------

    def _open(self) -> None:
        """Load the model and open the file (seconds): in a thread worker, the outcome posted back."""
        try:
            session = self.open_session()
        except DuetError as exc:
            self.post_message(SessionFailed(str(exc)))
            return
        except Exception as exc:  # a backend failure: said on screen, not a traceback over the UI
            self.post_message(SessionFailed(f"{type(exc).__name__}: {exc}"))
            return
        if self._gone:  # the screen went away while the model loaded
            session.close()
            return
        self.post_message(SessionOpened(session))

    def open_session(self) -> CollectSession:
        """The session this screen drives (loads the model: called in the thread worker)."""
        return open_session(self.config, self.prompts, self.out, on_update=self._updated)

    def pane_title(self, pane: str) -> str:
        return {"left": "1 · left", "right": "2 · right"}[pane]

    def pane_text(self, answers: Answers, pane: str) -> str:
        """The text ``pane`` shows of ``answers``."""
        return pane_text(answers, pane)

    def tally_text(self) -> Text:
        assert self.session is not None
        tally = Text(self.session.tally().text(), style="dim")
        tally.append(f"  → {self.out.name}")
        return tally

    def verdict_name(self, verdict: str) -> str:
        return verdict.replace("_", " ")

    def _updated(self, answers: Answers) -> None:
        """A token streamed in (the generation thread): only flag it; `_sync` redraws at REFRESH_HZ."""
        self.updates += 1
        self._dirty = True

    @on(SessionOpened)
    def opened(self, message: SessionOpened) -> None:
        if self._gone:
            message.session.close()
            return
        self.session = message.session
        self.session.start()
        self.show()

    @on(SessionFailed)
    def failed(self, message: SessionFailed) -> None:
        self.failure = message.message
        self.query_one("#prompt-text", Static).update(Text(message.message, style="bold red"))
        self.query_one("#collect-status", Static).update(Text("could not start collecting — q to quit", "bold"))

    def _sync(self) -> None:
        if self._dirty:
            self._dirty = False
            self.show()

    # -- what is shown ----------------------------------------------------------------------------------

    def show(self) -> None:
        if self.session is None:
            return
        answers = self.session.current()
        self.query_one("#tally", Static).update(self.tally_text())
        if answers is None:
            self._set_prompt(Text(self.ALL_JUDGED, style="bold"))
            for pane in self.PANES:
                self._set_pane(pane, "", "")
            self.query_one("#collect-status", Static).update(Text(self.ALL_JUDGED, style="bold green"))
            return
        self._set_prompt(prompt_text(answers))
        state = "failed" if answers.error else "ready" if answers.done else "generating…"
        for pane in self.PANES:
            text = self.pane_text(answers, pane) if answers.done or self.STREAMING else ""
            self._set_pane(pane, text, state if text or not answers.done else "empty answer")
        self.query_one("#collect-status", Static).update(status_text(answers, self.RETRY_HINT, self.READY))

    def _set_prompt(self, text: Text) -> None:
        widget = self.query_one("#prompt-text", Static)
        if widget.content != text:  # the prompt rarely changes; a redraw per token would be waste
            widget.update(text)

    def _set_pane(self, pane: str, text: str, state: str) -> None:
        widget = self.query_one(f"#{pane}-text", Static)
        if widget.content != text:
            widget.update(text)
        self.query_one(f"#{pane}-pane").border_subtitle = state

    # -- keys -------------------------------------------------------------------------------------------

    def _current(self, *, done: bool = True) -> Answers | None:
        """The pair a key acts on, or None with the reason said (loading, nothing left, still generating)."""
        if self.session is None:
            self.notify(self.failure or "the model is still loading", severity="warning", timeout=2)
            return None
        answers = self.session.current()
        if answers is None:
            self.notify(self.ALL_JUDGED_HINT, timeout=3)
            return None
        if done and answers.error:
            self.notify(f"this pair failed to generate: {self.RETRY_HINT}", severity="warning", timeout=3)
            return None
        if done and not answers.done:
            self.notify("still generating", timeout=1.5)
            return None
        return answers

    def _judged(self, record: dict[str, Any] | None) -> None:
        if record is None:  # the pair changed under the key (it cannot, from this screen); say so
            self.notify("nothing was recorded: the pair is not ready", severity="warning", timeout=2)
        self.show()

    def action_pick(self, pane: str) -> None:
        answers = self._current()
        if answers is not None and self.session is not None:
            self._judged(self.session.judge(generated_side(answers, pane)))

    def action_verdict(self, verdict: str) -> None:
        if self._current() is not None and self.session is not None:
            self._judged(self.session.judge(verdict))

    def action_skip(self) -> None:
        if self._current(done=False) is not None and self.session is not None:
            self._judged(self.session.judge("skip"))  # no need to wait for answers to pass a prompt by

    def action_edit(self, pane: str) -> None:
        answers = self._current()
        if answers is None:
            return
        key = (answers.index, answers.attempt)

        def save(text: str | None) -> None:
            current = self.session.current() if self.session is not None else None
            if text is None or current is None:
                return
            if (current.index, current.attempt) != key:
                self.notify("the pair changed while editing: nothing was recorded", severity="warning")
                return
            self._judged(self.session.judge(self.edit_verdict(current, pane), edited=text))

        self.app.push_screen(self.edit_dialog(pane, self.pane_text(answers, pane)), save)

    def edit_verdict(self, answers: Answers, pane: str) -> str:
        """What an edit of ``pane`` records: its side, preferred (the edit chosen over the other answer)."""
        return generated_side(answers, pane)

    def edit_dialog(self, pane: str, text: str) -> EditDialog:
        return EditDialog(pane, text)

    def action_regenerate(self) -> None:
        if self._current(done=False) is not None and self.session is not None:
            self.session.regenerate()
            self.show()

    def action_undo(self) -> None:
        if self.session is None:
            self.notify(self.failure or "the model is still loading", severity="warning", timeout=2)
            return
        record = self.session.undo()
        if record is None:
            self.notify("nothing to undo", timeout=2)
        else:
            self.notify(f"undone: {self.verdict_name(record['duet']['verdict'])}; the prompt is back", timeout=2)
        self.show()

    def action_add_prompt(self) -> None:
        if self.session is None:
            self.notify(self.failure or "the model is still loading", severity="warning", timeout=2)
            return

        def add(text: str | None) -> None:
            if text and self.session is not None and self.session.add_prompt(text) is not None:
                self.notify("added: it is judged next", timeout=2)
                self.show()

        self.app.push_screen(PromptDialog(), add)

    def action_train(self) -> None:
        from tui.dashboard import DashboardScreen
        from tui.session import TrainingSession

        if self.session is None:
            self.notify(self.failure or "the model is still loading", severity="warning", timeout=2)
            return
        if self.session.tally().judged == 0:  # ties, "both bad" and skips hold no preference to learn from
            self.notify(
                f"{self.out.name} holds no preference yet: judge a pair (1, 2, e or E) first",
                severity="warning",
                timeout=4,
            )
            return
        config = train_config_for(self.session.config, self.out)
        self.app.push_screen(DashboardScreen(session=TrainingSession(config)))

    def action_scroll(self, lines: int) -> None:
        for pane in self.PANES:  # both together: the answers are read side by side
            self.query_one(f"#{pane}-pane", AnswerPane).scroll_relative(y=lines, animate=False)

    def action_quit(self) -> None:
        self.app.exit()


def prompt_text(answers: Answers) -> Text:
    """The prompt: earlier turns (a system prompt, a conversation) dimmed, the question in bold."""
    text = Text()
    messages = answers.prompt.messages
    for role, content in messages[:-1]:
        text.append(f"{role}: ", style="dim bold")
        text.append(content + "\n", style="dim")
    text.append(messages[-1][1] if messages else "", style="bold")
    return text


def status_text(answers: Answers, retry_hint: str = "r tries again, s skips", ready: str = CollectScreen.READY) -> Text:
    if answers.error:
        return Text(f"generation failed: {answers.error} — {retry_hint}", style="bold red")
    if not answers.done:
        return Text("generating…", style="italic")
    return Text(ready, style="green")


THUMBS_ALL_RATED = "all prompts rated — p to add a prompt, u to undo, q to quit"
THUMBS_NAMES = {"up": "thumbs up", "down": "thumbs down", "skip": "skip"}


class ThumbsScreen(CollectScreen, inherit_bindings=False):
    """One answer at a time, rated thumbs up or down (``duet collect PROMPTS --out FILE --thumbs``): unpaired
    feedback, which KTO trains on. The pair screen's queue, background generation, undo and typed prompts;
    an edit is recorded as a thumbs up on the edited text; "train on these" trains KTO on the file."""

    BINDINGS: ClassVar[list[BindingType]] = [
        # priority: ↑ ↓ would scroll the prompt; here they are the verdicts (the answer scrolls with PgUp/PgDn)
        Binding("plus,1,up", "verdict('up')", "thumbs up", key_display="+/1/↑", priority=True),
        Binding("minus,2,down", "verdict('down')", "thumbs down", key_display="-/2/↓", priority=True),
        Binding("s", "skip", "skip"),
        Binding("e", "edit('answer')", "edit → up"),  # the edit is recorded as a thumbs up
        Binding("r", "regenerate", "regenerate"),
        Binding("u", "undo", "undo"),
        Binding("p", "add_prompt", "new prompt"),
        Binding("T", "train", "train (KTO)", key_display="T"),
        Binding("pageup", "scroll(-10)", "scroll", key_display="PgUp/Dn"),
        Binding("pagedown", "scroll(10)", "page down", show=False),
        Binding("q", "quit", "quit"),
    ]
    ALL_JUDGED: ClassVar[str] = THUMBS_ALL_RATED
    ALL_JUDGED_HINT: ClassVar[str] = "every prompt is rated: p adds one, u takes the last rating back"
    PANES: ClassVar[tuple[str, ...]] = ("answer",)
    READY: ClassVar[str] = "ready: is this answer good (+) or bad (-)?"

    def open_session(self) -> CollectSession:
        return open_session(self.config, self.prompts, self.out, on_update=self._updated, thumbs=True)

    def pane_title(self, pane: str) -> str:
        return "the answer"

    def pane_text(self, answers: Answers, pane: str) -> str:
        return answers.texts[0]

    def tally_text(self) -> Text:
        assert self.session is not None
        tally = Text(self.session.tally().text(), style="dim")
        tally.append(f"  → {self.out}")  # the whole path, as given: where the ratings go
        return tally

    def verdict_name(self, verdict: str) -> str:
        return THUMBS_NAMES.get(verdict, verdict)

    def edit_verdict(self, answers: Answers, pane: str) -> str:
        return "up"  # the edit is the answer the person wants: a thumbs up on it

    def edit_dialog(self, pane: str, text: str) -> EditDialog:
        return EditDialog(pane, text, title="Edit the answer: saved, the edit is recorded as a thumbs up")

    def action_train(self) -> None:
        from tui.dashboard import DashboardScreen
        from tui.session import TrainingSession

        if self.session is None:
            self.notify(self.failure or "the model is still loading", severity="warning", timeout=2)
            return
        if self.session.tally().judged == 0:  # skips rate nothing
            self.notify(f"{self.out.name} holds no rating yet: + or - first", severity="warning", timeout=4)
            return
        config = train_config_for(self.session.config, self.out, objective="kto")
        self.app.push_screen(DashboardScreen(session=TrainingSession(config)))
