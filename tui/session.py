"""A training run driven from the TUI: ``app.run.run`` in a worker thread, its events posted as messages.

The UI thread never waits on training. Pause, stop and "save now" go through ``RunControl`` and take
effect between optimizer steps; generation for the "try it" panel takes the step lock, so it runs between
steps (or while paused, or after the run) on the very model being trained.
"""

from __future__ import annotations

import io
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from textual.message import Message

from app.api import Config, DuetError, Event, RunControl, RunStarted


class RunEvent(Message):
    """One event from the run (the same that go to metrics.jsonl)."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


class TrainingFinished(Message):
    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


class TrainingFailed(Message):
    """The run raised: the message to show, and the traceback when it was not a user-facing error."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__()
        self.message = message
        self.details = details


class TrainingSession:
    def __init__(self, config: Config | None = None, resume: Path | None = None) -> None:
        self.config = config
        self.resume = resume
        self.control = RunControl()
        self.backend: Any = None
        self.chat: Any = None
        self.result: Any = None
        self.run_dir: Path | None = None

    def run(self, post: Callable[[Message], Any]) -> None:
        """The whole run; call it in a worker thread. Every outcome arrives as a message through ``post``."""
        from app.api import run

        def on_event(event: Event) -> None:
            if isinstance(event, RunStarted):
                self.run_dir = Path(event.run_dir)
            post(RunEvent(event))

        try:
            self.result = run(
                self.config,
                resume=self.resume,
                callback=on_event,
                console=Console(file=io.StringIO()),
                control=self.control,
                handle_signals=False,
                on_ready=self._ready,
            )
        except DuetError as exc:
            post(TrainingFailed(str(exc)))
        except Exception as exc:  # a bug or a backend failure: show it, keep the UI alive
            post(TrainingFailed(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        else:
            post(TrainingFinished(self.result))

    def _ready(self, backend: Any, data: Any) -> None:
        self.backend, self.chat = backend, data.chat

    @property
    def can_generate(self) -> bool:
        return self.backend is not None and self.chat is not None

    def generate(self, prompt: str, *, adapter: bool, max_new_tokens: int = 96) -> str:
        """A greedy reply with the adapter on or off, taken between training steps."""
        ids = self.chat.prompt_ids([{"role": "user", "content": prompt}])
        with self.control.step_lock:
            reply = self.backend.generate(
                [ids],
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                adapter=adapter,
                stop_ids=self.chat.stop_ids,
                pad_id=self.chat.pad_id,
            )[0]
        return self.chat.decode(reply)
