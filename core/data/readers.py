"""Read raw rows from preference-data sources: JSON lines, JSON, parquet (optionally gzip-compressed),
local dataset folders and Hugging Face dataset ids.

Readers only parse; they know nothing of preference formats. Every row carries its location so that a
later error can name the file and line. A row that cannot be parsed (invalid JSON, bytes that are not
UTF-8) is yielded with an ``error`` instead of data, so that ``skip_invalid`` can skip it; problems with
the file as a whole raise ``DataError`` at once.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.data.records import Location
from core.errors import DataError

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
# A row longer than this is a corrupt file or a whole document, not a preference pair: every model's context
# ends long before it, and tokenizing it only to cut it would take minutes.
MAX_ROW_BYTES = 16 * 1024 * 1024
DATASET_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".arrow", ".csv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class RawRow:
    location: Location
    data: Any = None
    error: str | None = None  # set when the row itself could not be parsed


def read_rows(source: str | Path, *, split: str = "train") -> Iterator[RawRow]:
    """Yield the rows of a file, a local dataset folder, or a Hugging Face dataset id."""
    path = Path(source).expanduser()
    if path.is_file():
        yield from _read_file(path, str(source))
    elif path.is_dir():
        yield from _read_dataset(str(path), split=split, name=str(source))
    elif _looks_like_hub_id(str(source)):
        yield from _read_dataset(str(source), split=split, name=str(source))
    else:
        raise DataError(
            f"{source}: no such file or folder. Give a .jsonl, .json or .parquet file (optionally .gz), "
            "a dataset folder, or a Hugging Face dataset id such as 'org/name'."
        )


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.endswith((*DATASET_FILE_SUFFIXES, ".gz"))


def _suffix_without_gzip(path: Path) -> tuple[str, bool]:
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] == ".gz"
    if compressed:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), compressed


def _read_bytes(path: Path, name: str, compressed: bool) -> bytes:
    try:
        if compressed:
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        what = "a valid gzip file" if compressed else "readable"
        raise DataError(f"{name}: the file is not {what} ({exc}).") from exc


def _read_file(path: Path, name: str) -> Iterator[RawRow]:
    suffix, compressed = _suffix_without_gzip(path)
    if suffix in JSON_LINES_SUFFIXES:
        yield from _json_lines(_read_bytes(path, name, compressed), name)
    elif suffix == ".json":
        yield from _json_document(_read_bytes(path, name, compressed), name)
    elif suffix == ".parquet":
        if compressed:
            raise DataError(f"{name}: gzip-compressed parquet is not supported; parquet compresses itself.")
        yield from _parquet(path, name)
    else:
        raise DataError(
            f"{name}: unsupported file type '{''.join(path.suffixes) or '(none)'}'. "
            "Use .jsonl, .json or .parquet (optionally .jsonl.gz / .json.gz)."
        )


def _utf8_error(name: str, data: bytes, exc: UnicodeDecodeError, line_offset: int = 0) -> str:
    line = data.count(b"\n", 0, exc.start) + 1 + line_offset
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return (
        f"{name}:{line}: the bytes are not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
        "save the file as UTF-8"
    )


def _json_lines(data: bytes, name: str) -> Iterator[RawRow]:
    if not data.strip():
        raise DataError(f"{name}: the file is empty; it should hold one JSON object per line.")
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        location = Location(name, line=number)
        if len(raw) > MAX_ROW_BYTES:
            yield RawRow(location, error=_too_long(len(raw)))
            continue
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            column = exc.start + 1
            yield RawRow(
                location,
                error=f"the bytes are not valid UTF-8 (byte 0x{raw[exc.start]:02x} at "
                f"column {column}); save the file as UTF-8",
            )
            continue
        try:
            yield RawRow(location, data=json.loads(text))
        except json.JSONDecodeError as exc:
            yield RawRow(location, error=_json_problem(exc))


def _json_problem(exc: json.JSONDecodeError) -> str:
    # some of json's messages end in "at" themselves ("Unterminated string starting at"): say it once
    return f"invalid JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}"


def _too_long(size: int) -> str:
    return (
        f"the row is {size / 2**20:.1f} MB long; Duet reads rows up to {MAX_ROW_BYTES // 2**20} MB (far beyond "
        "any model's context): is the file corrupt, or a document rather than preference pairs?"
    )


def _json_document(data: bytes, name: str) -> Iterator[RawRow]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(_utf8_error(name, data, exc)) from exc
    start = len(text) - len(text.lstrip())
    if start == len(text):
        raise DataError(f"{name}: the file is empty; it should hold a JSON array of objects.")
    if text[start] == "[":
        yield from _json_array(text, start, name)
        return
    values = list(_json_values(text, start, name))  # one object, or objects one after another (JSON lines)
    if len(values) == 1 and isinstance(values[0][1], dict) and len(values[0][1]) == 1:
        key, rows = next(iter(values[0][1].items()))
        if isinstance(rows, list) and rows and all(isinstance(row, dict) for row in rows):
            # {"data": [...]}: a wrapper whose one key holds the rows
            for number, row in enumerate(rows, start=1):
                yield RawRow(Location(f"{name} [{key}]", row=number), data=row)
            return
    for line, value in values:
        yield RawRow(Location(name, line=line), data=value)


def _json_values(text: str, position: int, name: str) -> Iterator[tuple[int, Any]]:
    """(line, value) for each JSON value in ``text``, values separated only by white space."""
    decoder = json.JSONDecoder()
    line, counted_to = 1, 0
    while position < len(text):
        line += text.count("\n", counted_to, position)  # counted from the last value on: linear, not quadratic
        counted_to = position
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{exc.lineno}: {_json_problem(exc)}.") from None
        yield line, value
        position = _skip_whitespace(text, position)


def _json_array(text: str, start: int, name: str) -> Iterator[RawRow]:
    """Walk a top-level JSON array element by element so each row knows the line it starts on."""
    decoder = json.JSONDecoder()
    position = _skip_whitespace(text, start + 1)
    line, counted_to = 1, 0

    def line_at(offset: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, offset)
        counted_to = offset
        return line

    if position < len(text) and text[position] == "]":
        return  # an empty array: the loader reports that there are no rows
    while True:
        value_start = position
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{exc.lineno}: {_json_problem(exc)}.") from exc
        location = Location(name, line=line_at(value_start))
        if position - value_start > MAX_ROW_BYTES:  # characters, near enough to bytes for this bound
            yield RawRow(location, error=_too_long(position - value_start))
        else:
            yield RawRow(location, data=value)
        position = _skip_whitespace(text, position)
        if position >= len(text):
            raise DataError(f"{name}:{line_at(len(text))}: invalid JSON: the array is not closed with ']'.")
        if text[position] == "]":
            break
        if text[position] != ",":
            raise DataError(f"{name}:{line_at(position)}: invalid JSON: expected ',' or ']' after an element.")
        position = _skip_whitespace(text, position + 1)
    rest = _skip_whitespace(text, position + 1)
    if rest < len(text):
        raise DataError(f"{name}:{line_at(rest)}: invalid JSON: extra data after the closing ']'.")


_WHITESPACE = re.compile(r"\s*")


def _skip_whitespace(text: str, position: int) -> int:
    match = _WHITESPACE.match(text, position)
    return match.end() if match else position


def _parquet(path: Path, name: str) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{name}: not a readable parquet file ({exc}).") from exc
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield RawRow(Location(name, row=number), data=row)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{name} row {number + 1}: the parquet data cannot be read ({exc}).") from None


def _read_dataset(source: str, *, split: str, name: str) -> Iterator[RawRow]:
    """A local dataset folder or a hub id, through ``datasets.load_dataset`` (or ``load_from_disk``)."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and (path / "dataset_info.json").exists() and (path / "state.json").exists():
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset(source, split=split)
    except FileNotFoundError as exc:
        raise DataError(f"{name}: no dataset found there ({exc}).") from exc
    except ValueError as exc:
        raise DataError(f"{name}: cannot load split '{split}' ({exc}).") from exc
    except Exception as exc:  # datasets raises many types (network, hub, format); report them plainly
        raise DataError(
            f"{name}: could not load this dataset ({type(exc).__name__}: {exc}). For a hub id, check the "
            "name and your network (or HF_HUB_OFFLINE); for a local folder, check it holds data files."
        ) from exc
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{name}: no split '{split}'; the splits are {sorted(dataset)}.")
        dataset = dataset[split]
    label = f"{name} [{split}]"
    for number, row in enumerate(dataset, start=1):
        yield RawRow(Location(label, row=number), data=row)
