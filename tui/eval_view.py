"""The Eval screen (``duet eval RUN --tui``): what training changed. The evaluation runs in a thread worker
(it loads the model and generates: tens of seconds to minutes); its progress and messages arrive as messages,
and the report it writes into ``RUN/eval`` is shown as Markdown. A run evaluated before shows its report at
once; r evaluates again (the answers come from the cache), b opens a person's blind A/B of the run.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Markdown, Static

from app.api import DuetError, Event, Progress, evaluate, format_duration, read_report, render_markdown
from tui.collect import KeyLegend
from tui.dialogs import ConfirmDialog

REPORT_FOLDER = "eval"  # where `evaluate` writes a run's report (RUN/eval)
BAR_WIDTH = 16
MAX_LOG_LINES = 200


class EvalCancelled(BaseException):
    """Raised from the event callback once the screen is gone: the evaluation stops at its next event.
    A BaseException, so that no ``except Exception`` on the way swallows it."""


class EvalEvent(Message):
    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


class EvalFinished(Message):
    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


class EvalFailed(Message):
    """The evaluation raised: the message to show, and the traceback when it was not a user-facing error."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__()
        self.message = message
        self.details = details


class ReportFound(Message):
    """The report an earlier evaluation of this run left (None: there is none, so evaluate now)."""

    def __init__(self, report: dict[str, Any] | None, folder: Path) -> None:
        super().__init__()
        self.report = report
        self.folder = folder


def earlier_report(source: Path) -> tuple[dict[str, Any] | None, Path]:
    """(the report of ``source`` an earlier evaluation wrote, or None; its folder). A run's reports go into
    RUN/eval, a checkpoint's too, a bare adapter's into ADAPTER/eval: the report found is used only when it is
    of this very adapter (a run's final one, or this checkpoint)."""
    path = source.expanduser().resolve()
    run = next((p for p in (path, *path.parents) if (p / "config.yaml").is_file()), None)
    folder = (run or path) / REPORT_FOLDER
    if not (folder / "eval.json").is_file():
        return None, folder
    try:
        report = read_report(folder)
    except (OSError, ValueError):  # a damaged report: evaluate again
        return None, folder
    adapter = Path(str((report or {}).get("adapter") or ""))
    mine = adapter == path or (run == path and adapter.parent == path and report.get("run") == str(path))
    return (report if mine else None), folder


def shown_path(path: Path | str) -> str:
    """A path as short as it reads: relative to the working folder when inside it, ~ for the home folder."""
    path = Path(path)
    for root, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        try:
            return prefix + str(path.resolve().relative_to(root.resolve())) if path.is_absolute() else str(path)
        except ValueError:
            continue
    return str(path)


def report_markdown(report: dict[str, Any]) -> str:
    """eval.md as the screen shows it: without its first heading, which the screen's title line says."""
    text = render_markdown(report)
    if text.startswith("# "):
        text = text.split("\n", 1)[1].lstrip("\n") if "\n" in text else ""
    return text


def progress_text(event: Progress) -> Text:
    """``label  ━━━━━━━━────────  3/6 prompts · 0:04 elapsed · ETA 0:04``"""
    share = min(1.0, event.done / event.total) if event.total else 0.0
    filled = round(share * BAR_WIDTH)
    text = Text.assemble((event.label or event.phase, "bold"), "  ")
    text.append("━" * filled, style="green")
    text.append("─" * (BAR_WIDTH - filled), style="dim")
    text.append(f"  {event.done}/{event.total} {event.unit} · {format_duration(event.elapsed)} elapsed")
    if not event.finished:
        text.append(f" · ETA {format_duration(event.eta)}")
    return text


class EvalScreen(Screen):
    """Evaluate a run (or a checkpoint or adapter folder): the tuned model against its base on held-out
    prompts, the report when done. Opened on its own (the app's first screen) q ends the app."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "rerun", "re-run"),
        Binding("b", "blind", "blind A/B (judge it yourself)"),
        Binding("up", "scroll(-1)", "scroll", key_display="↑↓"),
        Binding("down", "scroll(1)", "scroll", show=False),
        Binding("pageup", "scroll(-10)", "page up", show=False),
        Binding("pagedown", "scroll(10)", "page down", show=False),
        Binding("home", "scroll_to(0)", "top", show=False),
        Binding("end", "scroll_to(-1)", "end", show=False),
        Binding("q", "quit", "quit"),
        Binding("escape", "quit", "quit", show=False),
    ]

    def __init__(
        self,
        source: str | Path,
        overrides: Sequence[str] = (),
        prompts: str | None = None,
        checkpoints: bool = False,
    ) -> None:
        super().__init__()
        self.source, self.overrides, self.prompts, self.checkpoints = str(source), list(overrides), prompts, checkpoints
        self.report: dict[str, Any] | None = None  # the report shown
        self.laid_out: dict[str, Any] | None = None  # the report whose every block is mounted
        self.folder: Path | None = None  # where it is
        self.result: Any = None  # the last EvalResult of this screen
        self.failure: str | None = None  # the last evaluation's error, while no report replaced it
        self.running = False
        self.runs = 0  # evaluations started from this screen
        self.log_lines: list[str] = []
        self._activity = ""  # the last message, on the progress line while no Progress says more
        self._started = 0.0
        self._gone = False

    # -- layout -----------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(self._title(), id="eval-title")
        yield Static(Text("looking for an earlier report…", style="italic"), id="eval-progress")
        with VerticalScroll(id="eval-report"):
            yield Markdown(id="report", open_links=False)
        with VerticalScroll(id="eval-log"):
            yield Static("", id="eval-log-text", markup=False)
        keys = [(b.key_display or b.key, b.description) for b in self.BINDINGS if isinstance(b, Binding) and b.show]
        yield KeyLegend(keys, id="legend")

    def _title(self, report: dict[str, Any] | None = None) -> Text:
        """``Evaluation of RUN against BASE · prompts FILE``: what the report's own heading says, on one line."""
        title = Text.assemble(("Evaluation of ", "bold"), (self.source, "bold"))
        if report is not None and report.get("base"):
            title.append(f" against {report['base']}", style="bold")
        details = [f"prompts {self.prompts}" if self.prompts else "the run's held-out prompts"]
        if self.checkpoints:
            details.append("every checkpoint")
        title.append("  " + " · ".join(details), style="dim")
        return title

    def on_mount(self) -> None:
        self.add_class("quiet")
        self.run_worker(self._find_report, thread=True, name="eval-report", exit_on_error=False)
        self.set_interval(1.0, self._tick)

    def on_unmount(self) -> None:
        self._gone = True

    # -- the evaluation, off the UI thread --------------------------------------------------------------

    def _find_report(self) -> None:
        try:
            report, folder = earlier_report(Path(self.source))
        except Exception:  # unreadable: evaluating writes a new one
            report, folder = None, Path(self.source) / REPORT_FOLDER
        self.post_message(ReportFound(report, folder))

    def _evaluate(self) -> None:
        try:
            result = evaluate(
                self.source,
                overrides=self.overrides,
                prompts=self.prompts,
                checkpoints=self.checkpoints,
                emit=self._emit,
            )
        except EvalCancelled:
            return
        except DuetError as exc:
            if not self._gone:
                self.post_message(EvalFailed(str(exc)))
        except Exception as exc:  # a bug or a backend failure: said on screen, the UI stays alive
            if not self._gone:
                self.post_message(EvalFailed(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        else:
            if not self._gone:
                self.post_message(EvalFinished(result))

    def _emit(self, event: Event) -> None:
        """An event of the evaluation (its thread): posted to the UI thread, never waited on."""
        if self._gone:
            raise EvalCancelled
        self.post_message(EvalEvent(event))

    def start(self) -> None:
        self.running, self.failure, self._activity = True, None, "loading the model…"
        self.runs += 1
        self._started = time.monotonic()
        self._log(("evaluating again" if self.runs > 1 else "evaluating") + self._settings())
        self._show_activity()
        self.run_worker(self._evaluate, thread=True, name="evaluate", exit_on_error=False)

    # -- what arrives -----------------------------------------------------------------------------------

    @on(ReportFound)
    async def found(self, message: ReportFound) -> None:
        self.folder = message.folder
        if message.report is None:
            self.start()
            return
        line = Text(f"the last evaluation's report, in {shown_path(message.folder)}", style="green")
        line.append(" — r evaluates again", style="default")
        self._progress(line)
        await self._show_report(message.report)

    @on(EvalEvent)
    def event(self, message: EvalEvent) -> None:
        event = message.event
        if isinstance(event, Progress):
            self._progress(progress_text(event))
            return
        if event.message:
            self._log(event.message)
            self._activity = event.message
            self._show_activity()

    @on(EvalFinished)
    async def finished(self, message: EvalFinished) -> None:
        self.running, self.result = False, message.result
        seconds = time.monotonic() - self._started
        folder = message.result.folder
        self.folder = folder or self.folder
        where = f"written to {shown_path(folder)} (eval.md, charts, answers)" if folder else "not written"
        self._progress(Text(f"done: the report is {where}", style="green"))
        self.notify(f"the evaluation took {format_duration(seconds)}", timeout=4)
        await self._show_report(message.result.report)

    @on(EvalFailed)
    def failed(self, message: EvalFailed) -> None:
        self.running, self.failure = False, message.message
        self._log(f"failed: {message.message}")
        if message.details:
            self._log(message.details.rstrip())
        line = Text(message.message, style="bold red")
        line.append(" — r tries again, q quits", style="default")
        self._progress(line)

    @on(Markdown.LinkClicked)
    def link(self, message: Markdown.LinkClicked) -> None:
        """The report's links are its charts (PNG files beside eval.md): say where, a terminal cannot show them."""
        href = message.href
        if "://" not in href and self.folder is not None:
            href = shown_path(self.folder / href)
        self.notify(href, title="open it in an image viewer", timeout=8)

    # -- what is shown ----------------------------------------------------------------------------------

    async def _show_report(self, report: dict[str, Any]) -> None:
        self.report = report
        self.add_class("has-report")
        self.query_one("#eval-title", Static).update(self._title(report))
        # The Markdown widget mounts its blocks after update() returns; wait for them so that the log's
        # scroll (its pane shrinks under a report) and anyone watching `laid_out` see the final layout.
        await self.query_one("#report", Markdown).update(report_markdown(report))
        self._log_to_end()
        self.laid_out = report

    def _progress(self, text: Text) -> None:
        self.query_one("#eval-progress", Static).update(text)

    def _settings(self) -> str:
        return f" with {' '.join(self.overrides)}" if self.overrides else ""

    def _show_activity(self) -> None:
        text = Text(f"evaluating · {format_duration(time.monotonic() - self._started)} · ", style="bold")
        text.append(self._activity, style="italic not bold")
        self._progress(text)

    def _tick(self) -> None:
        """While nothing but the model loading happens, the clock on the progress line says it is alive."""
        progress = self.query_one("#eval-progress", Static)
        if self.running and str(progress.content).startswith("evaluating ·"):
            self._show_activity()

    def _log(self, line: str) -> None:
        self.remove_class("quiet")
        self.log_lines.append(line)
        del self.log_lines[:-MAX_LOG_LINES]
        self.query_one("#eval-log-text", Static).update("\n".join(self.log_lines))
        self._log_to_end()

    def _log_to_end(self) -> None:
        """The log's last lines in view, once laid out (after a line more, or the log shrunk under a report)."""
        log = self.query_one("#eval-log", VerticalScroll)
        log.call_after_refresh(log.scroll_end, animate=False)

    @property
    def logged(self) -> str:
        return "\n".join(self.log_lines)

    # -- keys -------------------------------------------------------------------------------------------

    def action_rerun(self) -> None:
        if self.running:
            self.notify("the evaluation is running", timeout=2)
        elif self.folder is None:
            self.notify("looking for an earlier report", timeout=2)
        else:
            self.start()

    def action_blind(self) -> None:
        from tui.blind import BlindScreen

        if self.running:  # a second copy of the model beside the one evaluating: wait for it
            self.notify("the evaluation is running: b once it is done", severity="warning", timeout=3)
            return

        def back(tally: str | None) -> None:
            if tally:
                self._log(tally)
                self.notify(f"{tally}\nr evaluates again to add your verdicts to the report", timeout=8)

        self.app.push_screen(BlindScreen(self.source, self.overrides, self.prompts), back)

    def action_scroll(self, lines: int) -> None:
        self.query_one("#eval-report", VerticalScroll).scroll_relative(y=lines, animate=False)

    def action_scroll_to(self, where: int) -> None:
        view = self.query_one("#eval-report", VerticalScroll)
        view.scroll_to(y=view.max_scroll_y if where < 0 else 0, animate=False)

    def action_quit(self) -> None:
        if not self.running:
            self._leave()
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._leave()

        self.app.push_screen(
            ConfirmDialog(
                "The evaluation is running. Leave? It stops at its next step, without a report.", yes="Leave"
            ),
            answer,
        )

    def _leave(self) -> None:
        self._gone = True  # a running evaluation stops at its next event
        if self.app.screen_stack.index(self) <= 1:  # the app's own screen: leaving it ends the app
            failed = self.failure is not None and self.report is None
            self.app.exit(return_code=1 if failed else 0)
        else:
            self.dismiss()
