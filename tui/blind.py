"""The blind A/B (``duet eval RUN --blind``, or b on the Eval screen): the Collect screen on a session whose
answer "a" comes from the tuned model and "b" from the base, shown in random left/right order; a person's
verdicts go to ``RUN/blind-ab.jsonl``, and the next evaluation of the run reports the person's win rate.

Only the judging keys: editing, regenerating, typing a prompt or training on the verdicts would bias the test
or make no sense in it. Nothing on screen says which side is which until the person leaves; the answers show
only once both are generated (the tuned one is generated first: watching them stream would give it away).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static

from app.api import BLIND_FILE, CollectSession, open_blind_session
from tui.collect import CollectScreen

TITLE = "Blind A/B: which answer is better?"
ALL_JUDGED = "all prompts judged — q to leave (the tally shows then)"
HIDDEN_ACTIONS = ("edit", "regenerate", "add_prompt", "train")  # the Collect screen's keys a blind test has not


def blind_tally(records: Sequence[dict[str, Any]]) -> str:
    """One line: how often the person preferred the tuned answer, the base one, or neither."""
    counts: Counter[str] = Counter()
    for record in records:
        meta = record.get("duet", {})
        verdict = meta.get("verdict")
        if verdict in ("a", "b"):
            counts[(meta.get("sides") or {"a": "tuned", "b": "base"}).get(verdict, "?")] += 1
        else:
            counts[verdict] += 1
    line = f"tuned preferred {counts['tuned']}, base {counts['base']}, ties {counts['tie']}"
    if counts["both_bad"]:
        line += f", both bad {counts['both_bad']}"
    if counts["skip"]:
        line += f", skipped {counts['skip']}"
    return line


class BlindScreen(CollectScreen, inherit_bindings=False):
    """A person's blind A/B of a run (or a checkpoint or adapter folder) against its base model.

    Opened on its own (the app's first screen) quitting ends the app, with the tally as its parting message;
    pushed over another screen it is dismissed with the tally."""

    BINDINGS: ClassVar[list[BindingType]] = [
        # priority: a key a child might claim (← → scroll a container) is a verdict here
        Binding("1,left", "pick('left')", "left better", key_display="1/←", priority=True),
        Binding("2,right", "pick('right')", "right better", key_display="2/→", priority=True),
        Binding("t", "verdict('tie')", "tie"),
        Binding("x", "verdict('both_bad')", "both bad"),
        Binding("s", "skip", "skip"),
        Binding("u", "undo", "undo"),
        Binding("up", "scroll(-1)", "scroll", key_display="↑↓"),
        Binding("down", "scroll(1)", "scroll", show=False),
        Binding("pageup", "scroll(-10)", "page up", show=False),
        Binding("pagedown", "scroll(10)", "page down", show=False),
        Binding("q", "quit", "quit"),
        Binding("escape", "quit", "quit", show=False),
    ]
    ALL_JUDGED: ClassVar[str] = ALL_JUDGED
    ALL_JUDGED_HINT: ClassVar[str] = "every prompt is judged: u takes the last verdict back, q leaves"
    RETRY_HINT: ClassVar[str] = "s skips"
    STREAMING: ClassVar[bool] = False

    def __init__(self, source: str | Path, overrides: Sequence[str] = (), prompts: str | None = None) -> None:
        # the config and the file are the session's, known once it is open (the run folder decides both)
        super().__init__(None, prompts, Path(source) / BLIND_FILE)  # type: ignore[arg-type]
        self.source, self.overrides = str(source), list(overrides)
        self.tally_line: str | None = None  # said when leaving, never while judging

    def compose(self) -> ComposeResult:
        yield Static(Text(TITLE, style="bold"), id="blind-title")
        yield from super().compose()

    def loading_text(self) -> str:
        return f"loading the model of {self.source} (with and without its adapter)…"

    def open_session(self) -> CollectSession:
        session = open_blind_session(
            self.source, overrides=self.overrides, prompts=self.prompts, on_update=self._updated
        )
        self.config, self.out = session.config, session.file.path
        return session

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return action not in HIDDEN_ACTIONS

    # a blind test has none of these, even when called by name
    def action_edit(self, pane: str) -> None:
        pass

    def action_regenerate(self) -> None:
        pass

    def action_add_prompt(self) -> None:
        pass

    def action_train(self) -> None:
        pass

    def action_quit(self) -> None:
        if self.session is not None:
            self.tally_line = f"blind A/B of {Path(self.source).name}: {blind_tally(self.session.file.records)}"
        if self.app.screen_stack.index(self) <= 1:  # the app's own screen: leaving it ends the app
            self.app.exit(message=self.tally_line)
        else:
            self.dismiss(self.tally_line)
