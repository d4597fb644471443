"""Browse the data as training will see it: the same summary and token-by-token view as `duet inspect`."""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from app.api import Config, DuetError


class InspectScreen(Screen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n,right", "next", "Next pair"),
        Binding("b,left", "previous", "Previous pair"),
        Binding("f", "first_truncated", "Next truncated"),
        Binding("escape", "close", "Back"),
    ]

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.inspection = None
        self.position = 0

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="inspect"):
            yield Static("loading the tokenizer and the data…", id="summary")
            yield Static("", id="pair")
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    @work(thread=True, exclusive=True)
    def load(self) -> None:
        from app.api import inspect_data, load_tokenizer, resolve_data_source, summary

        data = self.config.data
        try:
            tokenizer = load_tokenizer(self.config.model.path, trust_remote_code=self.config.model.trust_remote_code)
            inspection = inspect_data(
                resolve_data_source(data.train),
                tokenizer,
                format=data.format,
                columns=data.columns,
                split=data.split,
                skip_invalid=data.skip_invalid,  # as training will
                chat_template=data.chat_template,
                max_length=data.max_length,
                max_prompt_length=data.max_prompt_length,
            )
        except DuetError as exc:
            self.app.call_from_thread(self.query_one("#summary", Static).update, f"cannot inspect: {exc}")
            return
        self.app.call_from_thread(
            self._loaded, inspection, summary(inspection, batch_size=self.config.train.batch_size)
        )

    def _loaded(self, inspection, overview) -> None:
        self.inspection = inspection
        self.query_one("#summary", Static).update(overview)
        self.show()

    def show(self) -> None:
        from app.api import render_pair

        if not self.inspection or not self.inspection.tokenized:
            return
        self.position %= len(self.inspection.tokenized)
        self.query_one("#pair", Static).update(render_pair(self.inspection, self.position))
        self.sub_title = f"pair {self.position + 1} of {len(self.inspection.tokenized)}"

    def action_next(self) -> None:
        self.position += 1
        self.show()

    def action_previous(self) -> None:
        self.position -= 1
        self.show()

    def action_first_truncated(self) -> None:
        if not self.inspection:
            return
        count = len(self.inspection.tokenized)
        for step in range(1, count + 1):
            candidate = (self.position + step) % count
            if self.inspection.tokenized[candidate].truncated:
                self.position = candidate
                self.show()
                return
        self.notify("no pair is truncated at these length limits")

    def action_close(self) -> None:
        self.app.pop_screen()
