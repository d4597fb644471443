"""Load a preference-data source into ``PreferencePair`` records, with a report of what was read."""

from __future__ import annotations

import re
import shlex
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.data.formats import FORMATS_BY_NAME, Format, RowError, detect_format, known_formats_text
from core.data.readers import RawRow, read_rows
from core.data.records import PreferencePair, is_untrained_judgement
from core.errors import DataError

DETECTION_SAMPLE = 64  # rows looked at to detect the format
MAX_EXAMPLES = 10  # skipped rows listed in the report


@dataclass
class LoadReport:
    source: str
    format: str = ""
    rows: int = 0
    pairs: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason kind → count
    skipped_examples: list[str] = field(default_factory=list)
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)  # "file:12 repeats file:3"
    duplicates_dropped: bool = False
    ties: int = 0
    unpreferred_judgements: int = 0  # collected ties, "both bad" and skips: recorded, not trained on
    multi_turn: int = 0
    with_system: int = 0
    desirable: int = 0  # unpaired examples rated desirable (thumbs-up)
    undesirable: int = 0
    warnings: list[str] = field(default_factory=list)  # said before training, with the tokenizer's

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary_lines(self) -> list[str]:
        what = f"{self.pairs} pairs"
        if self.desirable or self.undesirable:
            what = f"{self.pairs} examples ({self.desirable} desirable, {self.undesirable} undesirable)"
        lines = [f"{display_path(self.source)}: format {self.format}, {self.rows} rows → {what}"]
        details = [f"{self.multi_turn} multi-turn", f"{self.with_system} with a system message"]
        if self.duplicates:
            dropped = ", dropped" if self.duplicates_dropped else ""
            details.append(f"{self.duplicates} duplicated pairs{dropped} (e.g. {self.duplicate_examples[0]})")
        if self.ties:
            details.append(f"{self.ties} with equal scores")
        if self.unpreferred_judgements:
            details.append(f"{self.unpreferred_judgements} collected ties/both-bad/skips left out")
        lines.append("  " + ", ".join(details))
        if self.skipped:
            reasons = ", ".join(f"{count} {kind}" for kind, count in self.skipped.most_common())
            lines.append(f"  skipped {self.skipped_total} invalid rows ({reasons})")
            lines += [f"    {example}" for example in self.skipped_examples]
        return lines


def display_path(source: str) -> str:
    """A path as short as it can be told: relative to the working directory when it lies inside it."""
    path = Path(source)
    if path.is_absolute():
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return source
    return source


def load_preferences(
    source: str | Path,
    *,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    drop_duplicates: bool = False,
    max_examples: int | None = MAX_EXAMPLES,
) -> tuple[list[PreferencePair], LoadReport]:
    """Read ``source`` and normalize every row.

    ``columns`` renames the source's columns to Duet's (``{"prompt": "question", "chosen": "response_j"}``).
    A bad row raises ``DataError`` naming its file, line and field (and how many more rows are bad), or with
    ``skip_invalid`` is counted in the report and left out; the report lists ``max_examples`` of them (None: all).
    """
    name = str(source)
    raw_rows = list(read_rows(source, split=split))
    report = LoadReport(source=name, rows=len(raw_rows))
    if not raw_rows:
        raise DataError(f"{name}: no rows found; the file or split is empty.")
    judged = [raw for raw in raw_rows if raw.error is None and is_untrained_judgement(raw.data)]
    if judged:  # a collected judgements file: its ties and skips are a record, not a preference
        report.unpreferred_judgements = len(judged)
        raw_rows = [raw for raw in raw_rows if raw.error is not None or not is_untrained_judgement(raw.data)]
        if not raw_rows:
            raise DataError(
                f"{name}: its {len(judged)} judgements are all ties, 'both bad' or skips; there is no preference "
                "to train on yet. Collect more (duet collect) and judge an answer better."
            )
    rename = _column_renamer(columns or {})
    fmt = _choose_format(raw_rows, format, rename, name)
    report.format = fmt.name

    pairs: list[PreferencePair] = []
    seen: dict[PreferencePair, PreferencePair] = {}
    report.duplicates_dropped = drop_duplicates
    first_error: str | None = None  # without skip_invalid: the first bad row, reported once all are counted
    for raw in raw_rows:
        try:
            pair = _normalize(raw, fmt, rename, columns or {})
        except RowError as error:
            message = f"{raw.location}: {_describe(error, columns or {})}"
            report.skipped[error.kind] += 1
            first_error = first_error or (None if skip_invalid else message)
            if max_examples is None or len(report.skipped_examples) < max_examples:
                report.skipped_examples.append(message)
            continue
        if first_error is not None:
            continue  # the load fails: the rest is read only to count the bad rows
        if pair in seen:
            report.duplicates += 1
            if len(report.duplicate_examples) < MAX_EXAMPLES:
                report.duplicate_examples.append(f"{raw.location} repeats {seen[pair].location}")
            if drop_duplicates:
                continue
        else:
            seen[pair] = pair
        pairs.append(pair)
        report.multi_turn += pair.num_user_turns > 1
        report.with_system += pair.system is not None
        report.ties += pair.score_chosen is not None and pair.score_chosen == pair.score_rejected
    if first_error is not None:
        raise DataError(_strict_error(first_error, report, name))
    report.pairs = len(pairs)
    if not pairs:
        raise DataError(
            f"{name}: none of its {report.rows} rows is a usable pair "
            f"({', '.join(f'{n} {k}' for k, n in report.skipped.most_common())}); first: "
            f"{report.skipped_examples[0] if report.skipped_examples else '-'}"
        )
    return pairs, report


def _strict_error(first: str, report: LoadReport, name: str) -> str:
    skip = "pass --skip-invalid (data.skip_invalid: true) to skip bad rows"
    bad = report.skipped_total
    if bad == 1:
        return f"{first}. Fix the row, or {skip}."
    return (
        f"{first}. {bad - 1} more of the {report.rows} rows are bad too ({bad} in all); list them with "
        f"`duet inspect {shlex.quote(name)} --model MODEL --skip-invalid`. Fix them, or {skip}."
    )


def _column_renamer(columns: Mapping[str, str]):
    source_to_duet = {source: duet for duet, source in columns.items()}

    def rename(row: Mapping[str, Any]) -> dict[str, Any]:
        renamed: dict[str, Any] = {}
        for key, value in row.items():
            target = source_to_duet.get(key, key)
            if key in columns and key not in source_to_duet:
                continue  # a source column that shadows a Duet name another column is mapped to
            renamed[target] = value
        return renamed

    return rename


def _describe(error: RowError, columns: Mapping[str, str]) -> str:
    """The row error with its field, in the user's own column names where they were remapped."""
    text = error.message
    if error.field and not any(f"'{part}'" in text for part in error.field.split("/")):
        text = f"field '{error.field}': {text}"
    renamed = []
    for duet_name, source_name in columns.items():
        text, count = re.subn(rf"'{re.escape(duet_name)}(?=['\[./])", f"'{source_name}", text)
        if count:
            renamed.append(f"{source_name} → {duet_name}")
    if renamed:
        text += f" (columns mapped: {', '.join(renamed)})"
    return text


def _choose_format(raw_rows: list[RawRow], requested: str, rename, name: str) -> Format:
    if requested != "auto":
        if requested not in FORMATS_BY_NAME:
            raise DataError(f"unknown data format '{requested}'; the formats are: auto, {', '.join(FORMATS_BY_NAME)}.")
        return FORMATS_BY_NAME[requested]
    votes: Counter[str] = Counter()
    keys_seen: Counter[str] = Counter()
    for raw in raw_rows[:DETECTION_SAMPLE]:
        if raw.error is not None or not isinstance(raw.data, Mapping):
            continue
        row = rename(raw.data)
        keys_seen.update(row.keys())
        fmt = detect_format(row)
        if fmt is not None:
            votes[fmt.name] += 1
    if votes:
        return FORMATS_BY_NAME[votes.most_common(1)[0][0]]
    seen = ", ".join(sorted(keys_seen)) if keys_seen else "(no JSON objects)"
    raise DataError(
        f"{name}: cannot tell which preference format this is. Keys seen in the first rows: {seen}.\n"
        f"Known formats:\n{known_formats_text()}\n"
        "Rename your columns with data.columns (e.g. data.columns.prompt=question) or set data.format."
    )


def _normalize(raw: RawRow, fmt: Format, rename, columns: Mapping[str, str]) -> PreferencePair:
    if raw.error is not None:
        kind = "invalid JSON" if raw.error.startswith("invalid JSON") else "unreadable row"
        raise RowError(None, raw.error, kind)
    if not isinstance(raw.data, Mapping):
        raise RowError(
            None, f"expected an object with the {fmt.name} fields, got {type(raw.data).__name__}", "wrong type"
        )
    parts = fmt.normalize(rename(raw.data))
    return PreferencePair(
        parts.prompt,
        parts.chosen,
        parts.rejected,
        parts.system,
        raw.location,
        parts.score_chosen,
        parts.score_rejected,
        parts.label,
    )
