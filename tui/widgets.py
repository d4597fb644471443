"""The dashboard's widgets: metric charts, the margin histogram, the status line."""

from __future__ import annotations

import math

import numpy
from rich.text import Text
from textual.geometry import Size
from textual.widget import Widget
from textual_plotext import PlotextPlot

from app.api import Progress, TrainStep, format_duration
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
            for start in sorted(state.round_starts):  # iterative rounds: where each later round began
                plt.vline(start + 0.5, color="gray")
        self.refresh()


class MarginHistogram(Widget):
    """Per-pair reward margins of the latest batch (and of the last evaluation): the spread, not the mean.

    Drawn as text at any size: shared bins for both sets, side by side in their colours, named in the title
    (not in a legend over the bars), the count axis marked at 0 and at its whole-number top only."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = DashboardState()

    def draw(self, state: DashboardState) -> None:
        self.state = state
        self.refresh()

    def render(self) -> Text:
        return Text("\n").join(histogram_lines(self.state, self.content_size.width, self.content_size.height))


BLOCKS = " ▁▂▃▄▅▆▇█"


def histogram_lines(state: DashboardState, width: int, height: int) -> list[Text]:
    candidates = [(state.eval_margins, "eval", "yellow"), (state.margins, "batch", "cyan")]
    sets = [(values, label, color) for values, label, color in candidates if values]
    title = [Text("margins", style="bold")] + ([Text(f"step {state.step}")] if state.margins else [])
    title += [Text.assemble(("■ ", color), label) for _, label, color in sets] if len(sets) > 1 else []
    lines = _pack(title, width, " · ")
    if not sets:
        return [*lines, Text("no margins yet", style="dim")]
    everything = [x for values, _, _ in sets for x in values]
    low, high = min(everything), max(everything)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    top_count = 1
    counts = []
    edges = None
    label_width = 0
    for _ in range(2):  # the count labels' width decides the columns left for bins, which decide the counts
        columns = max(len(sets), width - label_width - 1)
        bins = max(1, min(columns // len(sets), _bins(max(len(v) for v, _, _ in sets))))
        edges = numpy.linspace(low, high, bins + 1)
        counts = [numpy.histogram(values, edges)[0].tolist() for values, _, _ in sets]
        top_count = count_ticks(max(max(c) for c in counts))[-1]
        label_width = len(str(top_count))
    share = max(1, (width - label_width - 1) // (bins * len(sets)))  # columns per bin per set
    rows = max(1, height - len(lines) - 2)
    zero = int((0 - low) / (high - low) * bins * len(sets) * share) if low < 0 < high else None
    for row in range(rows):
        label = str(top_count) if row == 0 else "0" if row == rows - 1 else ""
        line = Text(f"{label:>{label_width}}" + ("┤" if label else "│"), style="dim")
        column = 0
        for b in range(bins):
            for (_, _, color), counted in zip(sets, counts, strict=True):
                eighths = counted[b] / top_count * rows * 8 - (rows - 1 - row) * 8
                block = BLOCKS[int(min(8, max(0, round(eighths))))]
                for _ in range(share):
                    if block == " " and column == zero:
                        line.append("│", style="red")  # where the margin changes sign
                    else:
                        line.append(block, style=color)
                    column += 1
        lines.append(line)
    span = bins * len(sets) * share
    axis = " " * label_width + "└" + "─" * span
    ends = f"{low:.3g}", f"{high:.3g}"
    scale = list(" " * (label_width + 1 + span))
    scale[label_width + 1 : label_width + 1 + len(ends[0])] = ends[0]
    scale[len(scale) - len(ends[1]) :] = ends[1]
    if zero is not None and label_width + len(ends[0]) + 1 < label_width + 1 + zero < len(scale) - len(ends[1]) - 1:
        scale[label_width + 1 + zero] = "0"
    return [*lines, Text(axis, style="dim"), Text("".join(scale), style="dim")]


def count_ticks(top: int, most: int = 4) -> list[int]:
    """Whole-number ticks from 0, evenly spaced, reaching at least ``top``."""
    step = max(1, math.ceil(top / most))
    return list(range(0, step * math.ceil(top / step) + 1, step))


def step_ticks(state: DashboardState, count: int = 5) -> list[int]:
    """A few whole-number step ticks across the steps seen so far."""
    last = max([s.steps[-1] for s in (*state.train.values(), *state.eval.values()) if s] or [1])
    if last <= count:
        return list(range(1, last + 1))
    return sorted({round(1 + i * (last - 1) / (count - 1)) for i in range(count)})


def _bins(count: int) -> int:
    return max(4, min(20, int(math.sqrt(count)) * 2))


class RunStatus(Widget):
    """What is training, where it stands, how fast, how much memory, and a long phase's progress; every
    figure on screen at any width: the parts wrap onto further lines instead of running off the edge."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = DashboardState()
        self.source = ""

    def show(self, state: DashboardState, source: str) -> None:
        self.state, self.source = state, source
        self.refresh(layout=True)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return len(status_lines(self.state, self.source, width))

    def render(self) -> Text:
        return Text("\n").join(status_lines(self.state, self.source, self.content_size.width))


def status_lines(state: DashboardState, source: str, width: int) -> list[Text]:
    run, latest = state.run, state.latest
    bar = 20 if width >= 100 else 10
    what = [run.objective, f"{run.backend} {run.device}".strip(), run.dtype] if run else []
    head = [
        Text(f" {state.phase.upper()} ", style=_PHASE_STYLES.get(state.phase, "reverse")),
        Text(" · ".join(str(w) for w in what if w)),
        Text(source),
    ]
    figures: list[Text] = []
    total = state.total_steps
    if total:
        figures.append(_bar(f"step {state.step}/{total}", state.step / total, bar))
    if latest is not None:
        figures += step_figures(latest, state.phase == "training")
    if state.round is not None:
        figures[:0] = round_figures(state)
    lines = _pack(head, width, "  ") + _pack(figures, width, " · ")
    if state.progress:
        lines += _pack(progress_parts(state.progress, bar), width, " · ")
    return lines


def round_figures(state: DashboardState) -> list[Text]:
    """Iterative rounds: which round and phase, and the judge's win rate of the latest finished round over
    the previous round's policy (and over the base)."""
    current = state.round
    assert current is not None
    figures = [Text(f"round {current.round}/{current.rounds} {current.phase}", style="bold")]
    if state.round_results:
        last = state.round_results[max(state.round_results)]
        if last.win_rate_vs_previous is not None:
            figures.append(Text(f"r{last.round} win vs prev {last.win_rate_vs_previous:.2f}"))
        if last.win_rate_vs_base is not None:
            figures.append(Text(f"vs base {last.win_rate_vs_base:.2f}"))
    return figures


def step_figures(latest: TrainStep, training: bool) -> list[Text]:
    """The latest step's loss, margin, accuracy, speed, ETA, memory and learning rate, those it has."""
    figures: list[Text] = []
    for key, label, spec in (
        ("loss", "loss", ".4f"),
        ("rewards/margins", "margin", ".3f"),
        ("rewards/accuracies", "acc", ".2f"),
        ("log_odds_chosen", "log odds", ".3f"),  # ORPO's own: the chosen over the rejected reply, in log odds
        ("kl", "KL", ".3f"),  # KTO's own: z0, its estimate of KL(policy ‖ reference), the reference point
    ):
        value = latest.metrics.get(key)
        if isinstance(value, (int, float)):
            figures.append(Text(f"{label} {value:{spec}}"))
    if latest.tokens_per_second:
        figures.append(Text(f"{latest.tokens_per_second:.0f} tok/s"))
    if latest.eta is not None and training:
        figures.append(Text(f"ETA {format_duration(latest.eta)}"))
    peak = latest.memory.get("peak_device") or latest.memory.get("peak_rss")
    if peak:
        figures.append(Text(f"mem {peak / GIB:.2f} GiB"))
    if isinstance(latest.learning_rate, (int, float)):
        figures.append(Text(f"lr {latest.learning_rate:.2e}"))
    return figures


def progress_parts(event: Progress, bar: int) -> list[Text]:
    """A long phase's progress (loading, tokenizing, the reference pass, ...): a bar with a count and an ETA."""
    label = f"{event.phase or 'working'} {event.done}/{event.total} {event.unit}".rstrip()
    parts = [_bar(label, event.done / event.total if event.total else 1.0, bar)]
    if event.eta is not None:
        parts.append(Text(f"ETA {format_duration(event.eta)}"))
    return parts


def _bar(label: str, done: float, width: int) -> Text:
    done = min(1.0, max(0.0, done))
    filled = int(done * width)
    return Text.assemble(f"{label} ", ("█" * filled + "░" * (width - filled), "green"), f" {done:4.0%}")


def _pack(parts: list[Text], width: int, separator: str) -> list[Text]:
    """The parts in order, as many a line as fit in ``width`` (a part is never split unless it alone is wider)."""
    lines: list[Text] = []
    line = Text()
    for part in parts:
        if not part.plain:
            continue
        if line.plain and line.cell_len + len(separator) + part.cell_len > width:
            lines.append(line)
            line = Text()
        elif line.plain:
            line.append(separator)
        line.append_text(part)
    if line.plain:
        lines.append(line)
    return lines


_PHASE_STYLES = {
    "training": "black on green",
    "paused": "black on yellow",
    "stopped": "black on yellow",
    "finished": "black on cyan",
    "failed": "white on red",
    "not running": "white on red",
    "waiting": "black on grey70",
}
