"""The dashboard's widgets: metric charts, the margin histogram, the status line."""

from __future__ import annotations

import math

from rich.text import Text
from textual.widgets import Static
from textual_plotext import PlotextPlot

from core.metrics import format_duration
from tui.state import DashboardState

GIB = 1024**3
CHARTS = {
    # id: (title, [(series key, label)], eval too)
    "loss": ("loss", [("loss", "train")], True),
    "margins": ("reward margin", [("rewards/margins", "train")], True),
    "accuracy": ("reward accuracy", [("rewards/accuracies", "train")], True),
    "rewards": ("rewards", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")], False),
    "logps": ("log-probs", [("logps/chosen", "chosen"), ("logps/rejected", "rejected")], False),
    "lr": ("learning rate", [("learning_rate", "lr")], False),
}
COLORS = ("cyan", "orange", "green", "magenta")


class MetricChart(PlotextPlot):
    """A metric over steps: train (and eval, marked) series, y-axis fitted to the data."""

    def __init__(self, chart: str, **kwargs) -> None:
        super().__init__(id=f"chart-{chart}", classes="chart", **kwargs)
        self.chart = chart

    def draw(self, state: DashboardState) -> None:
        title, series, with_eval = CHARTS[self.chart]
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(title)
        drawn = False
        for (key, label), color in zip(series, COLORS, strict=False):
            points = state.train[key]
            if points:
                plt.plot(
                    points.steps,
                    points.values,
                    label=label if len(series) > 1 or with_eval else None,
                    color=color,
                    marker="braille",
                )
                drawn = True
            if with_eval and state.eval[key]:  # evaluations are points in time, not a curve
                plt.scatter(state.eval[key].steps, state.eval[key].values, label="eval", color="yellow", marker="●")
                drawn = True
        if not drawn:
            plt.text("waiting for the first step", 0.5, 0.5, alignment="center")
            plt.xlim(0, 1)
            plt.ylim(0, 1)
        else:
            plt.xticks(step_ticks(state))
        self.refresh()


class MarginHistogram(PlotextPlot):
    """Per-pair reward margins of the latest batch (and of the last evaluation): the spread, not the mean."""

    def draw(self, state: DashboardState) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        step = state.step
        plt.title(f"margins, step {step}" if state.margins else "margins")
        values = state.eval_margins or state.margins
        if state.eval_margins:  # drawn first, so the latest batch stays on top
            plt.hist(state.eval_margins, bins=_bins(len(state.eval_margins)), label="eval", color="yellow")
        if state.margins:
            plt.hist(state.margins, bins=_bins(len(state.margins)), label="batch", color="cyan")
        if not values:
            plt.text("no margins yet", 0.5, 0.5, alignment="center")
            plt.xlim(0, 1)
            plt.ylim(0, 1)
        else:
            plt.vline(0.0, "red")
        self.refresh()


def step_ticks(state: DashboardState, count: int = 5) -> list[int]:
    """A few whole-number step ticks across the steps seen so far."""
    last = max([s.steps[-1] for s in (*state.train.values(), *state.eval.values()) if s] or [1])
    if last <= count:
        return list(range(1, last + 1))
    return sorted({round(1 + i * (last - 1) / (count - 1)) for i in range(count)})


def _bins(count: int) -> int:
    return max(4, min(20, int(math.sqrt(count)) * 2))


class RunStatus(Static):
    """One or two lines: what is training, where it stands, how fast, how much memory."""

    def show(self, state: DashboardState, source: str) -> None:
        run, latest = state.run, state.latest
        total = state.total_steps
        line = Text()
        line.append(f" {state.phase.upper()} ", style=_PHASE_STYLES.get(state.phase, "reverse"))
        what = [
            run.get("objective"),
            run.get("backend") and f"{run['backend']} {run.get('device', '')}".strip(),
            run.get("dtype"),
        ]
        line.append("  " + " · ".join(str(w) for w in what if w) + f"  {source}")
        progress = Text()
        if total:
            done = min(1.0, state.step / total)
            filled = int(done * 20)
            progress.append(f" step {state.step}/{total} ")
            progress.append("█" * filled + "░" * (20 - filled), style="green")
            progress.append(f" {done:4.0%}")
        figures = []
        for key, label, spec in (
            ("loss", "loss", ".4f"),
            ("rewards/margins", "margin", ".3f"),
            ("rewards/accuracies", "acc", ".2f"),
        ):
            if isinstance(latest.get(key), (int, float)):
                figures.append(f"{label} {latest[key]:{spec}}")
        if latest.get("tokens_per_second"):
            figures.append(f"{latest['tokens_per_second']:.0f} tok/s")
        if latest.get("eta") is not None and state.phase == "training":
            figures.append(f"ETA {format_duration(latest['eta'])}")
        memory = latest.get("memory") or {}
        peak = memory.get("peak_device") or memory.get("peak_rss")
        if peak:
            figures.append(f"mem {peak / GIB:.2f} GiB")
        if isinstance(latest.get("learning_rate"), (int, float)):
            figures.append(f"lr {latest['learning_rate']:.2e}")
        progress.append("  " + " · ".join(figures))
        self.update(Text("\n").join([line, progress]))


_PHASE_STYLES = {
    "training": "black on green",
    "paused": "black on yellow",
    "stopped": "black on yellow",
    "finished": "black on cyan",
    "failed": "white on red",
    "not running": "white on red",
    "waiting": "black on grey70",
}
