"""One report per evaluation: eval.json, eval.md, PNG charts and the answers, written as one unit.

The caller measures; this module only renders and writes. A report is a JSON-safe dict; any value may be
None (or absent) when that part was not measured, and is then shown as "n/a" or its chart is skipped::

    {
     "version": 1, "created": "ISO time", "run": "path or null", "adapter": "path", "base": "model name or path",
     "training": {"objective": "dpo", "beta": 0.1, "steps": 120, "lr": 5e-5} | null,
     "settings": {"prompts": "file or 'held-out split'", "num_prompts": 48, "samples": 2, "greedy": false,
                  "sampling": {"temperature": 0.8, "top_p": 1.0, "top_k": 0, "max_new_tokens": 128, "seed": 0},
                  "kl_samples": 1, "judge": "rule:concise.py" | "model:PATH" | null},
     "judge": {"name": "rule:concise.py", "kind": "rule", "wins": 30, "ties": 5, "losses": 13, "n": 48,
               "rate": 0.68, "low": 0.55, "high": 0.78, "both_orders": true, "consistency": 0.9 | null} | null,
     "length_controlled": {"rate": 0.6, "low": 0.5, "high": 0.7, "slope": -1.2, "unit": "tokens"} | null,
     "human": {same keys as judge} | null,
     "lengths": {"base": [ints…], "tuned": [ints…]},
     "degeneration": {"base": {"answers": 96, "finished": 0.98, "empty": 0.0, "distinct_1": 0.3,
                               "distinct_2": 0.6, "repeated_4gram": 0.01, "mean_tokens": 40.2,
                               "median_tokens": 38.0},
                      "tuned": {...}},
     "kl": {"per_answer": 3.2, "low": 2.8, "high": 3.6, "per_token": 0.08, "entropy_per_token": 1.1,
            "answers": 48, "tokens": 1900} | null,
     "pairs": {"step": 120, "reward_accuracy": 0.9, "margin": 1.3, "loss": 0.4, "margins": [floats…] | null} | null,
     "examples": [{"prompt": "…", "base": "…", "tuned": "…", "verdict": "tuned" | "base" | "tie"}],
     "checkpoints": [{"step": 20, "judge": {...} | null, "kl": {...} | null, "mean_tokens": 30.1}, …] | null
    }

Win rates are of the tuned model over the base, ties counting half; "low"/"high" bound a 95% interval.
KL is KL(tuned ‖ base) in nats, estimated on the tuned model's own samples at temperature 1.

A report folder (e.g. RUN/eval) holds eval.json, eval.md, the charts that apply and, when given,
answers.jsonl. ``write_report`` replaces it as a whole; ``read_report`` and ``recover_report`` put a
previous report back if a replacement was killed half-way.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import re
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.atomic import OLD_PREFIX, TEMP_PREFIX, atomic_directory, write_bytes, write_text

NA = "n/a"
MAX_EXAMPLES = 6
MAX_EXAMPLE_CHARS = 2000  # an answer that ran away would bury the rest of the report
DPI = 100
WIDE = (6.4, 3.6)  # inches: 640 x 360 pixels at DPI, a few tens of KB per chart
TRIPLE = (9.6, 3.2)
# Fixed style, so a user's matplotlibrc cannot change the charts (or their bytes) from one machine to the next
STYLE = {
    "font.family": "DejaVu Sans",  # bundled with matplotlib: the same glyphs everywhere
    "font.size": 8.0,
    "axes.titlesize": 9.0,
    "axes.grid": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "savefig.transparent": False,
    "path.simplify": True,
}
COLORS = {"base": "#7f7f7f", "tuned": "#1f77b4", "win": "#2ca02c", "tie": "#bdbdbd", "loss": "#d62728"}

HOW_TO_READ = (
    "A win rate is the share of prompts on which the judge preferred the tuned model's answer to the base "
    "model's, ties counting half: above 0.5 the tuned model is preferred more often than not, and an interval "
    "that stays above 0.5 means the preference is unlikely to be chance. Judges tend to favour longer answers, "
    "so the length-controlled (LC) win rate is the judge's preference at equal length: a logistic fit of the "
    "verdict on the length difference between the two answers, read at a difference of zero; its slope says "
    "how strongly length swayed the verdicts. KL per answer is KL(tuned ‖ base) in nats, estimated from the "
    "tuned model's own samples at temperature 1: how far training moved the model, whatever the judge "
    "thinks. Degeneration figures flag answers that stop being language (empty, cut off, repeating). The "
    "held-out pair figures are the training objective's implicit reward on pairs it never trained on. A judge "
    "only measures what it was written or prompted to measure: a high win rate says the tuned model does more "
    "of that, not that it is better in general."
)


# --- reading values that may be missing --------------------------------------------------------------------


def _get(data: Any, *keys: str | int) -> Any:
    """``data[k1][k2]…``, or None as soon as a level is missing or not a container."""
    for key in keys:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return None
    return data


def _number(value: Any) -> float | None:
    """A finite number, or None: NaN and infinities mean "not measured" here (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _numbers(values: Any) -> list[float]:
    if not isinstance(values, list):
        return []
    return [x for x in (_number(v) for v in values) if x is not None]


def _mean_tokens(report: dict[str, Any], side: str) -> float | None:
    """The degeneration statistics' mean when measured, else the mean of the raw lengths."""
    mean = _number(_get(report, "degeneration", side, "mean_tokens"))
    if mean is not None:
        return mean
    lengths = _numbers(_get(report, "lengths", side))
    return statistics.fmean(lengths) if lengths else None


def _median_tokens(report: dict[str, Any], side: str) -> float | None:
    median = _number(_get(report, "degeneration", side, "median_tokens"))
    if median is not None:
        return median
    lengths = _numbers(_get(report, "lengths", side))
    return statistics.median(lengths) if lengths else None


# --- formatting ----------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    number = _number(value)
    return NA if number is None else f"{number:.{digits}f}"


def _count(value: Any) -> str:
    number = _number(value)
    return NA if number is None else str(round(number))


def _interval(rate: Any, low: Any, high: Any, digits: int = 2) -> str:
    """``0.62 [0.55, 0.69]``; the bare rate when the interval was not computed."""
    if _number(rate) is None:
        return NA
    if _number(low) is None or _number(high) is None:
        return _fmt(rate, digits)
    return f"{_fmt(rate, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _rate_of(stats: Any, digits: int = 2) -> str:
    return _interval(_get(stats, "rate"), _get(stats, "low"), _get(stats, "high"), digits)


def _change(base: Any, tuned: Any, digits: int = 2, relative: bool = False) -> str:
    """The signed difference tuned − base (and the relative change for sizes such as lengths)."""
    before, after = _number(base), _number(tuned)
    if before is None or after is None:
        return NA
    text = f"{after - before:+.{digits}f}"
    if relative and before > 0:
        text += f" ({(after - before) / before:+.0%})"
    return text


def _escape(text: str) -> str:
    """Inline text as Markdown shows it literally: backslash-escape what would turn into markup or HTML."""
    return re.sub(r"([\\`*_\[\]<>|~&])", r"\\\1", text)


_BLOCK_START = re.compile(r"^(\s*)([#>+=-]|\d+[.)])")


def _escape_line(line: str) -> str:
    """One line of a quoted block: inline escapes, plus what only means something at a line's start
    (a heading, a nested quote, a list item, a setext underline)."""
    escaped = _escape(line)
    match = _BLOCK_START.match(escaped)
    if not match:
        return escaped
    # a numbered item is defused at its "." or ")", anything else at the marker itself
    cut = match.end(2) - 1 if match.group(2)[0].isdigit() else match.start(2)
    return escaped[:cut] + "\\" + escaped[cut:]


def _quote(text: Any) -> str:
    """A quoted block that shows ``text`` as written: escaped, with its line breaks kept."""
    if text is None:
        return "> *(not recorded)*"
    text = str(text)
    if not text.strip():
        return "> *(empty)*"
    if len(text) > MAX_EXAMPLE_CHARS:
        text = text[:MAX_EXAMPLE_CHARS] + " …(cut)"
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out = []
    for index, line in enumerate(lines):
        body = _escape_line(line.rstrip())
        more = index + 1 < len(lines) and lines[index + 1].strip()
        # a trailing backslash is CommonMark's hard line break: keeps the answer's own line structure
        out.append(f"> {body}\\" if body and more else f"> {body}".rstrip())
    return "\n".join(out)


def _code(text: Any) -> str:
    """An inline code span (for paths and names), fenced with more backticks than the text holds."""
    value = " ".join(str(text).split())
    longest = max((len(run) for run in re.findall(r"`+", value)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def _cell(text: str) -> str:
    """A table cell on one line, its bare pipes escaped: GFM splits cells on every pipe that no backslash
    escapes, even inside code spans (a backslash escapes the character after it, a backslash included)."""
    return re.sub(r"(\\.)|\|", lambda m: m.group(1) or "\\|", " ".join(text.split()))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- Markdown ------------------------------------------------------------------------------------------------


def _summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """metric | base | tuned | change. Comparisons of tuned with base have no base value of their own: "—"."""
    dash = "—"
    judge, human, lc = report.get("judge"), report.get("human"), report.get("length_controlled")
    rows = [["Judge win rate, tuned over base (ties half)", dash, _rate_of(judge), dash]]
    if isinstance(judge, dict) and _number(judge.get("n")):
        n = _number(judge["n"]) or 1.0
        shares = "/".join(_fmt((_number(judge.get(k)) or 0.0) / n) for k in ("wins", "ties", "losses"))
        counts = "/".join(_count(judge.get(k)) for k in ("wins", "ties", "losses"))
        rows.append(["Judge wins/ties/losses", dash, f"{shares} ({counts} of {_count(n)})", dash])
    else:
        rows.append(["Judge wins/ties/losses", dash, NA, dash])
    rows.append(["Length-controlled win rate", dash, _rate_of(lc), dash])
    slope = _number(_get(lc, "slope"))
    unit = _get(lc, "unit") or "tokens"
    slope_text = NA if slope is None else f"{slope:+.3g} log-odds per 100 {unit} of length difference"
    rows.append(["Length slope of the verdict", dash, slope_text, dash])
    if isinstance(human, dict):
        rows.append([f"Human blind A/B win rate (n={_count(human.get('n'))})", dash, _rate_of(human), dash])
    for label, function in (("Mean answer length (tokens)", _mean_tokens), ("Median answer length", _median_tokens)):
        base, tuned = function(report, "base"), function(report, "tuned")
        rows.append([label, _fmt(base, 1), _fmt(tuned, 1), _change(base, tuned, 1, relative=True)])
    kl = report.get("kl")
    rows.append(["KL(tuned ‖ base) per answer, nats", dash, _rate_of_kl(kl), dash])
    rows.append(["KL per token", dash, _fmt(_get(kl, "per_token"), 3), dash])
    rows.append(["Entropy per token (tuned)", dash, _fmt(_get(kl, "entropy_per_token"), 3), dash])
    for label, key in (
        ("Finished (ended by itself)", "finished"),
        ("Empty answers", "empty"),
        ("Distinct-1", "distinct_1"),
        ("Distinct-2", "distinct_2"),
        ("Repeated 4-grams", "repeated_4gram"),
    ):
        base, tuned = _get(report, "degeneration", "base", key), _get(report, "degeneration", "tuned", key)
        rows.append([label, _fmt(base, 3), _fmt(tuned, 3), _change(base, tuned, 3)])
    pairs = report.get("pairs")
    step = _get(pairs, "step")
    at = f" (step {_count(step)})" if _number(step) is not None else ""
    rows.append([f"Held-out pairs: reward accuracy{at}", dash, _fmt(_get(pairs, "reward_accuracy"), 3), dash])
    rows.append(["Held-out pairs: reward margin", dash, _fmt(_get(pairs, "margin"), 3), dash])
    rows.append(["Held-out pairs: loss", dash, _fmt(_get(pairs, "loss"), 3), dash])
    return rows


def _decoding(settings: Any) -> str:
    sampling = _get(settings, "sampling")
    most = _get(sampling, "max_new_tokens")
    limit = f"at most {_count(most)} new tokens" if _number(most) is not None else "no token limit recorded"
    if _get(settings, "greedy") is True:
        return f"greedy ({limit})"
    if not isinstance(sampling, dict):
        return NA
    top_k = _number(sampling.get("top_k"))
    parts = [
        f"temperature {_fmt(sampling.get('temperature'))}",
        f"top-p {_fmt(sampling.get('top_p'))}",
        "top-k off" if not top_k else f"top-k {_count(top_k)}",
        limit,
        f"seed {_count(sampling.get('seed'))}",
    ]
    return "sampling (" + ", ".join(parts) + ")"


def _judge_line(report: dict[str, Any]) -> str:
    judge = report.get("judge")
    name = _get(judge, "name") or _get(report, "settings", "judge")
    if not name:
        return "none (no judge was run)"
    text = _code(name)
    if _get(judge, "kind"):
        text += f" ({_escape(str(judge['kind']))})"
    both = _get(judge, "both_orders")
    if both is True:
        consistency = _get(judge, "consistency")
        text += f"; each pair judged in both orders, same verdict both ways on {_fmt(consistency)} of them"
    elif both is False:
        text += "; each pair judged in one order only (position bias not controlled)"
    return text


def _settings_lines(report: dict[str, Any]) -> list[str]:
    settings = report.get("settings")
    prompts = _get(settings, "prompts")
    training = report.get("training")
    kl = report.get("kl")
    lines = [
        f"- Prompts: {_code(prompts) if prompts else NA}, {_count(_get(settings, 'num_prompts'))} prompts, "
        f"{_count(_get(settings, 'samples'))} samples per prompt",
        f"- Decoding: {_decoding(settings)}",
        f"- Judge: {_judge_line(report)}",
        f"- KL: {_count(_get(settings, 'kl_samples'))} sample(s) per prompt at temperature 1 "
        f"({_count(_get(kl, 'answers'))} answers, {_count(_get(kl, 'tokens'))} tokens)",
    ]
    if isinstance(training, dict):
        objective = training.get("objective")
        lr = _number(training.get("lr"))
        lines.append(
            f"- Training: {_escape(str(objective)) if objective else NA}, β {_fmt(training.get('beta'), 3)}, "
            f"{_count(training.get('steps'))} steps, learning rate {NA if lr is None else f'{lr:.3g}'}"
        )
    for label, key in (("Run", "run"), ("Adapter", "adapter"), ("Base", "base"), ("Created", "created")):
        value = report.get(key)
        lines.append(f"- {label}: {_code(value) if value else NA}")
    return lines


def _checkpoint_lines(report: dict[str, Any]) -> list[str]:
    checkpoints = report.get("checkpoints")
    if not isinstance(checkpoints, list) or not checkpoints:
        return []
    rows = [
        [
            _count(_get(c, "step")),
            _rate_of(_get(c, "judge")),
            _rate_of_kl(_get(c, "kl")),
            _fmt(_get(c, "mean_tokens"), 1),
        ]
        for c in checkpoints
        if isinstance(c, dict)
    ]
    header = ["step", "judge win rate", "KL per answer", "mean tuned length"]
    return ["## Checkpoints", "", _table(header, rows), ""]


def _rate_of_kl(kl: Any) -> str:
    return _interval(_get(kl, "per_answer"), _get(kl, "low"), _get(kl, "high"))


_VERDICT_WORDS = {
    "tuned": ("not preferred", "preferred"),
    "base": ("preferred", "not preferred"),
    "tie": ("tie", "tie"),
}


def _example_lines(report: dict[str, Any], max_examples: int) -> list[str]:
    examples = report.get("examples")
    lines = ["## Examples", ""]
    if not isinstance(examples, list) or not examples:
        return [*lines, "No examples were recorded.", ""]
    shown = [e for e in examples if isinstance(e, dict)][:max_examples]
    lines += [f"{len(shown)} of {len(examples)} prompts, with the judge's verdict on each answer.", ""]
    for number, example in enumerate(shown, 1):
        verdict = example.get("verdict")
        base_word, tuned_word = _VERDICT_WORDS.get(str(verdict), ("not judged", "not judged"))
        lines += [f"### Example {number}", "", "**Prompt**", "", _quote(example.get("prompt")), ""]
        lines += [f"**Base** — {base_word}", "", _quote(example.get("base")), ""]
        lines += [f"**Tuned** — {tuned_word}", "", _quote(example.get("tuned")), ""]
    return lines


def render_markdown(report: dict[str, Any], max_examples: int = MAX_EXAMPLES) -> str:
    """eval.md: summary table, settings, charts, examples and how to read them."""
    subject = report.get("run") or report.get("adapter")
    title = f"# Evaluation of {_code(subject) if subject else 'the tuned model'}"
    base = report.get("base")
    title += f" against {_code(base)}" if base else " against its base"
    lines = [title, ""]
    lines += ["## Summary", "", _table(["metric", "base", "tuned", "change"], _summary_rows(report)), ""]
    lines += ["## Settings", "", *_settings_lines(report), ""]
    lines += _checkpoint_lines(report)
    charts = [(name, caption) for name, caption, applies, _ in CHARTS if applies(report)]
    lines += ["## Charts", ""]
    lines += [f"![{caption}]({name})" for name, caption in charts] or ["No charts: nothing to plot was measured."]
    lines += [""]
    lines += _example_lines(report, max_examples)
    lines += ["## How to read this", "", HOW_TO_READ, ""]
    return "\n".join(lines)


# --- charts --------------------------------------------------------------------------------------------------


def _stats_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The verdict sources to plot: the judge (rule or model) and people, when each was measured."""
    rows = []
    judge = report.get("judge")
    if isinstance(judge, dict):
        kind = str(_get(judge, "kind") or "judge")[:8]  # the margins leave room for labels this long
        rows.append((f"judge ({kind})", judge))
    human = report.get("human")
    if isinstance(human, dict):
        rows.append(("human", human))
    return rows


def _has_lengths(report: dict[str, Any]) -> bool:
    return bool(_numbers(_get(report, "lengths", "base")) or _numbers(_get(report, "lengths", "tuned")))


def _has_win_rates(report: dict[str, Any]) -> bool:
    rates = [_number(_get(stats, "rate")) for _, stats in _stats_rows(report)]
    rates.append(_number(_get(report, "length_controlled", "rate")))
    counts = [_number(_get(stats, "n")) for _, stats in _stats_rows(report)]
    return any(r is not None for r in rates) or any(counts)


def _has_margins(report: dict[str, Any]) -> bool:
    return bool(_numbers(_get(report, "pairs", "margins")))


def _has_checkpoints(report: dict[str, Any]) -> bool:
    checkpoints = report.get("checkpoints")
    return isinstance(checkpoints, list) and any(isinstance(c, dict) for c in checkpoints)


def _figure(size: tuple[float, float], margins: dict[str, float], panels: int = 1) -> tuple[Any, list[Any]]:
    # A bare Figure, not pyplot: no global figure registry to leak into, no GUI backend chosen or switched
    # (whatever backend the host program uses stays as it is); savefig renders PNG with Agg on its own.
    from matplotlib.figure import Figure

    # Fixed margins rather than a layout engine: every label is ours and bounded, and a layout engine
    # draws each chart twice (once to measure), a third of the time spent
    figure = Figure(figsize=size, dpi=DPI)
    axes = figure.subplots(1, panels, squeeze=False, gridspec_kw=margins)[0]
    return figure, list(axes)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    # No "Software" text chunk (matplotlib's version) and no date: the same report gives the same bytes
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _draw_lengths(report: dict[str, Any], figure_axes: tuple[Any, list[Any]]) -> None:
    _, (axes,) = figure_axes
    sides = {side: _numbers(_get(report, "lengths", side)) for side in ("base", "tuned")}
    longest = max(max(values, default=0.0) for values in sides.values())
    width = max(1, math.ceil((longest + 1) / 40))  # at most ~40 bins, each a whole number of tokens
    bins = [i * width for i in range(math.ceil((longest + 1) / width) + 1)]
    for side, values in sides.items():
        if not values:
            continue
        mean = statistics.fmean(values)
        color = COLORS[side]
        axes.hist(values, bins=bins, alpha=0.45, color=color, label=f"{side} (mean {mean:.1f}, n={len(values)})")
        axes.axvline(mean, color=color, linestyle="--", linewidth=1.2)
    axes.set_title("Answer length")
    axes.set_xlabel("tokens")
    axes.set_ylabel("answers")
    axes.legend(loc="upper right", frameon=False)


def _draw_win_rates(report: dict[str, Any], figure_axes: tuple[Any, list[Any]]) -> None:
    figure, (shares_axes, rates_axes) = figure_axes
    sources = _stats_rows(report)
    counted = [(label, stats) for label, stats in sources if _number(stats.get("n"))]
    for row, (_, stats) in enumerate(counted):
        n = _number(stats["n"]) or 1.0
        left = 0.0
        for key, name in (("wins", "win"), ("ties", "tie"), ("losses", "loss")):
            share = (_number(stats.get(key)) or 0.0) / n
            shares_axes.barh(row, share, height=0.5, left=left, color=COLORS[name], label=name if row == 0 else None)
            if share >= 0.08:
                shares_axes.text(left + share / 2, row, f"{share:.0%}", ha="center", va="center", fontsize=7)
            left += share
    shares_axes.set_yticks(range(len(counted)), [label for label, _ in counted])
    shares_axes.set_xlim(0, 1)
    shares_axes.invert_yaxis()
    shares_axes.set_title("Verdicts on tuned vs base")
    shares_axes.set_xlabel("share of prompts")
    if counted:  # below both panels, in the room the margins leave for it
        figure.legend(loc="lower center", ncol=3, frameon=False)
    points = [(label, stats) for label, stats in sources if _number(stats.get("rate")) is not None]
    if _number(_get(report, "length_controlled", "rate")) is not None:
        points.append(("length-controlled", report["length_controlled"]))
    for row, (_label, stats) in enumerate(points):
        rate = _number(stats.get("rate")) or 0.0
        low, high = _number(stats.get("low")), _number(stats.get("high"))
        error = [[max(0.0, rate - low)], [max(0.0, high - rate)]] if low is not None and high is not None else None
        rates_axes.errorbar(rate, row, xerr=error, fmt="o", color=COLORS["tuned"], capsize=3)
    rates_axes.axvline(0.5, color="black", linewidth=0.8, linestyle=":")
    rates_axes.set_yticks(range(len(points)), [label for label, _ in points])
    rates_axes.set_ylim(len(points) - 0.5, -0.5)
    rates_axes.set_xlim(0, 1)
    rates_axes.set_title("Win rate, 95% interval")
    rates_axes.set_xlabel("tuned preferred (ties half)")


def _draw_margins(report: dict[str, Any], figure_axes: tuple[Any, list[Any]]) -> None:
    _, (axes,) = figure_axes
    margins = _numbers(_get(report, "pairs", "margins"))
    right = sum(m > 0 for m in margins) / len(margins)
    axes.hist(margins, bins=min(40, max(5, len(margins) // 4)), color=COLORS["tuned"], alpha=0.8)
    axes.axvline(0.0, color="black", linewidth=0.8, linestyle=":")
    axes.set_title(f"Held-out pairs: reward margin (chosen − rejected); {right:.0%} above 0")
    axes.set_xlabel("margin")
    axes.set_ylabel("pairs")


def _series(checkpoints: list[Any], value: Callable[[Any], Any]) -> list[tuple[float, Any]]:
    """(step, value) for the checkpoints that have both."""
    out = []
    for checkpoint in checkpoints:
        step = _number(_get(checkpoint, "step"))
        if step is not None and value(checkpoint) is not None:
            out.append((step, value(checkpoint)))
    return out


def _draw_interval_series(axes: Any, series: list[tuple[float, Any]], keys: tuple[str, str, str]) -> None:
    rate_key, low_key, high_key = keys
    for step, stats in series:
        rate = _number(stats.get(rate_key))
        low, high = _number(stats.get(low_key)), _number(stats.get(high_key))
        error = [[max(0.0, rate - low)], [max(0.0, high - rate)]] if low is not None and high is not None else None
        axes.errorbar(step, rate, yerr=error, fmt="o", color=COLORS["tuned"], capsize=3)
    if series:
        axes.plot([s for s, _ in series], [_number(stats.get(rate_key)) for _, stats in series], color=COLORS["tuned"])


def _draw_checkpoints(report: dict[str, Any], figure_axes: tuple[Any, list[Any]]) -> None:
    _, (wins, kl, lengths) = figure_axes
    checkpoints = report["checkpoints"]
    judged = _series(checkpoints, lambda c: c["judge"] if _number(_get(c, "judge", "rate")) is not None else None)
    _draw_interval_series(wins, judged, ("rate", "low", "high"))
    wins.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    wins.set_ylim(0, 1)
    wins.set_title("Judge win rate")
    measured = _series(checkpoints, lambda c: c["kl"] if _number(_get(c, "kl", "per_answer")) is not None else None)
    _draw_interval_series(kl, measured, ("per_answer", "low", "high"))
    kl.set_title("KL per answer (nats)")
    sized = _series(checkpoints, lambda c: _number(_get(c, "mean_tokens")))
    lengths.plot([s for s, _ in sized], [v for _, v in sized], "o-", color=COLORS["tuned"])
    lengths.set_title("Mean tuned length (tokens)")
    for axes in (wins, kl, lengths):
        axes.set_xlabel("step")


def _single_figure() -> tuple[Any, list[Any]]:
    return _figure(WIDE, {"left": 0.09, "right": 0.98, "bottom": 0.13, "top": 0.92})


def _win_rates_figure() -> tuple[Any, list[Any]]:
    # room at the left and between the panels for their row labels, below for the legend
    return _figure(WIDE, {"left": 0.15, "right": 0.97, "bottom": 0.25, "top": 0.92, "wspace": 0.6}, panels=2)


def _checkpoints_figure() -> tuple[Any, list[Any]]:
    return _figure(TRIPLE, {"left": 0.05, "right": 0.99, "bottom": 0.15, "top": 0.9, "wspace": 0.22}, panels=3)


# name, caption, applies to a report, (make the figure, draw on it)
CHARTS: list[tuple[str, str, Callable[[dict[str, Any]], bool], tuple[Callable[[], Any], Callable[..., None]]]] = [
    ("lengths.png", "Answer lengths, base vs tuned", _has_lengths, (_single_figure, _draw_lengths)),
    ("win_rates.png", "Verdicts and win rates", _has_win_rates, (_win_rates_figure, _draw_win_rates)),
    ("margins.png", "Held-out pair margins", _has_margins, (_single_figure, _draw_margins)),
    ("checkpoints.png", "Win rate, KL and length by step", _has_checkpoints, (_checkpoints_figure, _draw_checkpoints)),
]


def render_charts(report: dict[str, Any], folder: Path) -> list[str]:
    """Write the charts that apply to ``report`` into ``folder`` as PNGs; return their file names."""
    import matplotlib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    # rc_context restores the caller's settings afterwards, so this borrows the style without keeping it
    with matplotlib.rc_context(STYLE):
        for name, _, applies, (make, draw) in CHARTS:
            if not applies(report):
                continue
            figure_axes = make()
            draw(report, figure_axes)
            write_bytes(folder / name, _png(figure_axes[0]))
            written.append(name)
    return written


# --- the report folder ---------------------------------------------------------------------------------------


def _json_text(report: dict[str, Any]) -> str:
    # NaN and infinities are not JSON (strict readers reject them): they mean "not measured", so null
    return json.dumps(_finite(report), indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _leftover_pid(name: str, prefix: str, report_name: str) -> int | None:
    """The writer's pid when ``name`` is a temporary of this report (``<prefix><report>.<pid>``)."""
    if not name.startswith(prefix):
        return None
    stem, _, pid = name[len(prefix) :].rpartition(".")
    return int(pid) if stem == report_name and pid.isdigit() else None


def _writer_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False  # another thread of this process may be writing it right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_report(folder: Path) -> None:
    """Clean up after a write of the report at ``folder`` that was killed: put the previous report back if
    it was moved aside and its replacement never arrived; remove the unfinished temporaries.

    Only this report's own temporaries are touched, and only those of writers that are gone: other atomic
    writes in the same run folder (a checkpoint being saved) are left alone.
    """
    folder = Path(folder)
    parent = folder.parent
    if not parent.is_dir():
        return
    olds = sorted(
        path
        for path in parent.glob(glob.escape(OLD_PREFIX) + "*")
        if (pid := _leftover_pid(path.name, OLD_PREFIX, folder.name)) is not None and _writer_gone(pid)
    )
    for old in olds:
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)  # killed after the swap: the new report is in place
        else:
            os.replace(old, folder)  # killed between the two renames: the previous report comes back
    for temp in parent.glob(glob.escape(TEMP_PREFIX) + "*"):
        pid = _leftover_pid(temp.name, TEMP_PREFIX, folder.name)
        if pid is not None and _writer_gone(pid):
            shutil.rmtree(temp, ignore_errors=True)


def write_report(folder: Path, report: dict[str, Any], answers: list[dict[str, Any]] | None = None) -> Path:
    """Write eval.json, eval.md, the charts and answers.jsonl (when given) as one unit into ``folder``.

    Everything is built in a temporary folder beside it and swapped in by ``atomic_directory``: a kill at
    any moment leaves the previous complete report or the new complete one. Between its two renames the
    folder is briefly absent, the previous report set aside; ``recover_report`` (run here first, and by
    ``read_report``) puts it back.
    """
    folder = Path(folder)
    recover_report(folder)
    with atomic_directory(folder, replace=True) as temp:
        write_text(temp / "eval.json", _json_text(report))
        write_text(temp / "eval.md", render_markdown(report))
        render_charts(report, temp)
        if answers is not None:
            lines = (json.dumps(_finite(answer), ensure_ascii=False, allow_nan=False) + "\n" for answer in answers)
            write_text(temp / "answers.jsonl", "".join(lines))
    return folder


def read_report(folder: Path) -> dict[str, Any] | None:
    """The report in ``folder`` (recovering it first if a write was killed half-way), or None if none."""
    folder = Path(folder)
    recover_report(folder)
    path = folder / "eval.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


# --- comparing runs ------------------------------------------------------------------------------------------


def compare_rows(reports: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per run after a sweep: its settings and headline figures (None where not measured)."""
    rows = []
    for label, report in reports:
        rows.append(
            {
                "label": label,
                "objective": _get(report, "training", "objective"),
                "beta": _number(_get(report, "training", "beta")),
                "steps": _number(_get(report, "training", "steps")),
                "win_rate": _number(_get(report, "judge", "rate")),
                "win_low": _number(_get(report, "judge", "low")),
                "win_high": _number(_get(report, "judge", "high")),
                "lc_rate": _number(_get(report, "length_controlled", "rate")),
                "kl_per_answer": _number(_get(report, "kl", "per_answer")),
                "kl_per_token": _number(_get(report, "kl", "per_token")),
                "mean_tokens_tuned": _mean_tokens(report, "tuned"),
                "mean_tokens_base": _mean_tokens(report, "base"),
                "reward_accuracy": _number(_get(report, "pairs", "reward_accuracy")),
            }
        )
    return rows


def render_compare(reports: list[tuple[str, dict[str, Any]]]) -> str:
    """The side-by-side Markdown table of ``compare_rows``."""
    header = [
        "run",
        "objective",
        "β",
        "steps",
        "judge win rate",
        "LC win rate",
        "KL per answer",
        "KL per token",
        "mean length tuned (base)",
        "held-out accuracy",
    ]
    body = []
    for row in compare_rows(reports):
        body.append(
            [
                _escape(str(row["label"])),
                _escape(str(row["objective"])) if row["objective"] else NA,
                _fmt(row["beta"], 3),
                _count(row["steps"]),
                _interval(row["win_rate"], row["win_low"], row["win_high"]),
                _fmt(row["lc_rate"]),
                _fmt(row["kl_per_answer"]),
                _fmt(row["kl_per_token"], 3),
                f"{_fmt(row['mean_tokens_tuned'], 1)} ({_fmt(row['mean_tokens_base'], 1)})",
                _fmt(row["reward_accuracy"], 3),
            ]
        )
    return _table(header, body) + "\n"
