"""``duet``: the terminal UI. Set up and train locally, or watch a headless run (``duet watch RUN_DIR``)."""

from __future__ import annotations

from pathlib import Path

from textual.app import App

from core.config import Config


class DuetApp(App):
    CSS_PATH = Path(__file__).parent / "duet.tcss"  # absolute: subclasses live elsewhere
    TITLE = "Duet"

    def __init__(
        self,
        config: Config | None = None,
        *,
        source: str = "the demo",
        watch: Path | None = None,
        resume: Path | None = None,
    ) -> None:
        super().__init__()
        self.initial_config = config
        self.source = source
        self.watch = watch
        self.resume = resume

    def on_mount(self) -> None:
        from tui.dashboard import DashboardScreen
        from tui.setup import SetupScreen

        if self.watch is not None:
            self.sub_title = f"watching {self.watch}"
            self.push_screen(DashboardScreen(follow=self.watch))
        elif self.resume is not None:
            from tui.session import TrainingSession

            self.push_screen(DashboardScreen(session=TrainingSession(resume=self.resume)))
        else:
            if self.initial_config is None:
                from core.run import resolve_config

                self.initial_config = resolve_config(None, ())
            self.push_screen(SetupScreen(self.initial_config, source=self.source))


def run_app(config_path: str | None = None, watch: str | None = None, resume: str | None = None) -> int:
    config, source = None, "the demo"
    if config_path is not None:
        from core.config import load_config

        config, source = load_config(config_path), config_path
    DuetApp(config, source=source, watch=Path(watch) if watch else None, resume=Path(resume) if resume else None).run()
    return 0
