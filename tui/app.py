"""``duet``: the terminal UI. Set up and train locally, watch a headless run (``duet watch RUN_DIR``),
collect preferences (``duet collect PROMPTS --out FILE``), or evaluate a run (``duet eval RUN --tui``) and
judge it blind (``duet eval RUN --blind``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen

from app.api import Config, DuetError

RUN_MARKERS = ("metrics.jsonl", "config.yaml")  # what a run directory holds from its first moments


class DuetApp(App):
    CSS_PATH = Path(__file__).parent / "duet.tcss"  # absolute: subclasses live elsewhere
    TITLE = "Duet"
    # shown in the footer on every screen; on the dashboard it stops a running training first (as q does)
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(
        self,
        config: Config | None = None,
        *,
        source: str = "the demo",
        watch: Path | None = None,
        resume: Path | None = None,
        collect: tuple[Config, str | None, str] | None = None,
        evaluate: tuple[str, list[str], str | None, bool] | None = None,
        blind: tuple[str, list[str], str | None] | None = None,
        thumbs: bool = False,
    ) -> None:
        super().__init__()
        self.initial_config = config
        self.source = source
        self.watch = watch
        self.resume = resume
        self.collect = collect  # (config, prompts file or None, judgements file): open on the Collect screen
        self.thumbs = thumbs  # the Collect screen rates one answer at a time, thumbs up or down
        self.evaluate = evaluate  # (run, overrides, prompts file or None, checkpoints): open on the Eval screen
        self.blind = blind  # (run, overrides, prompts file or None): open on the blind A/B

    def on_mount(self) -> None:
        from tui.dashboard import DashboardScreen
        from tui.setup import SetupScreen

        if self.watch is not None:
            self.sub_title = f"watching {self.watch}"
            self.push_screen(DashboardScreen(follow=self.watch))
        elif self.resume is not None:
            from tui.session import TrainingSession

            self.push_screen(DashboardScreen(session=TrainingSession(resume=self.resume)))
        elif self.collect is not None:
            from tui.collect import CollectScreen, ThumbsScreen

            self.sub_title = f"collecting into {self.collect[2]}"
            self.push_screen((ThumbsScreen if self.thumbs else CollectScreen)(*self.collect))
        elif self.evaluate is not None:
            from tui.eval_view import EvalScreen

            self.sub_title = f"evaluating {self.evaluate[0]}"
            self.push_screen(EvalScreen(*self.evaluate))
        elif self.blind is not None:
            from tui.blind import BlindScreen

            self.sub_title = f"blind A/B of {self.blind[0]}"
            self.push_screen(BlindScreen(*self.blind))
        else:
            if self.initial_config is None:
                from app.api import resolve_config

                self.initial_config = resolve_config(None, ())
            self.push_screen(SetupScreen(self.initial_config, source=self.source))

    async def action_quit(self) -> None:
        from tui.dashboard import DashboardScreen

        boards = [screen for screen in self.screen_stack if isinstance(screen, DashboardScreen)]
        if boards and boards[-1].training:
            boards[-1].action_quit_app()  # asks first, and stops the run with a checkpoint
        else:
            self.exit()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        from tui.dashboard import DashboardScreen

        if isinstance(screen, DashboardScreen):
            if screen.check_action("new_run", ()):
                yield SystemCommand("New run", "Set up a new run with this run's settings", screen.action_new_run)
            if screen.check_action("resume", ()):
                yield SystemCommand("Resume", "Resume this run from its last checkpoint", screen.action_resume)
        yield from super().get_system_commands(screen)


def nearby_runs(path: Path, limit: int = 8) -> list[Path]:
    """Run directories beside ``path`` (or inside it, when it is a folder of runs), closest names first."""
    import difflib

    folders = [path] if path.is_dir() else []
    folders.append(path.parent if path.parent.is_dir() else Path("."))
    runs = {
        child
        for folder in folders
        for child in folder.iterdir()
        if child.is_dir() and any((child / marker).is_file() for marker in RUN_MARKERS)
    }
    ranked = sorted(runs, key=lambda run: (-difflib.SequenceMatcher(None, run.name, path.name).ratio(), run.name))
    return ranked[:limit]


def check_watch_target(run_dir: Path) -> None:
    """A typo must not wait forever: the folder must exist and be a run (or the user asked to ``--wait``)."""
    if run_dir.is_dir() and any((run_dir / marker).is_file() for marker in RUN_MARKERS):
        return
    problem = "does not exist" if not run_dir.exists() else "is not a run directory (no metrics.jsonl or config.yaml)"
    runs = nearby_runs(run_dir)
    listing = "runs nearby:\n" + "\n".join(f"  {run}" for run in runs) if runs else "no runs nearby."
    raise DuetError(
        f"{run_dir} {problem}; {listing}\nTo wait for a run that has not started yet: duet watch --wait {run_dir}"
    )


def run_app(
    config_path: str | None = None,
    watch: str | None = None,
    resume: str | None = None,
    wait: bool = False,
    collect: tuple[Config, str | None, str] | None = None,
    evaluate: tuple[str, list[str], str | None, bool] | None = None,
    blind: tuple[str, list[str], str | None] | None = None,
    thumbs: bool = False,
) -> int:
    """The TUI; returns the exit status (1: ``evaluate`` ended on an error and no report was shown)."""
    if collect is not None:  # `duet collect`: the config is resolved already (its file and key=value overrides)
        DuetApp(collect[0], collect=collect, thumbs=thumbs).run()
        return 0
    if evaluate is not None or blind is not None:  # `duet eval RUN --tui` / `--blind`: the run's own config
        app = DuetApp(evaluate=evaluate, blind=blind)
        app.run()  # the blind A/B's tally is its parting message, printed once the terminal is back
        return app.return_code or 0
    config, source = None, "the demo"
    if config_path is not None:
        from app.api import load_config

        config, source = load_config(config_path), config_path
    if watch and not wait:
        check_watch_target(Path(watch))
    DuetApp(config, source=source, watch=Path(watch) if watch else None, resume=Path(resume) if resume else None).run()
    return 0
