"""Collected preferences: the prompts to ask, and the judgements file that is the product of collecting.

A judgements file is JSON lines in Duet's conversational format, so it trains as it is (``data.train:
FILE``): ``prompt`` (messages), ``chosen`` and ``rejected`` (one assistant message each), and a ``duet``
object with the provenance: the verdict, who judged, the model and adapter fingerprints, the sampling
settings and seeds, which answer was shown on the left, the time. Ties, "both bad" and skipped prompts are
recorded with their answers (or none) but without ``chosen``/``rejected``; the preference loader leaves them
out of training and counts them.

Durability: each judgement is one ``write`` of one whole line to a file opened for appending, then fsync.
A kill between judgements leaves every earlier line; a line cut short by a crash at the one moment it is
written is dropped when the file is opened again. Undo truncates the last line away (one syscall).

A thumbs file (``duet collect --thumbs``) holds unpaired feedback instead, in TRL's unpaired preference
format, which KTO trains on: ``prompt``, ``completion`` (one assistant message) and ``label`` (true: thumbs
up, false: thumbs down), with the same kind of ``duet`` object, marked ``"mode": "thumbs"``. A skipped
prompt is a line with ``prompt`` and ``duet`` only (verdict "skip"), never trained on. The two kinds never
share a file: `JudgementsFile` opened for one refuses a file that holds the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import faults
from core.atomic import fsync_dir
from core.data.readers import read_rows
from core.data.records import RECORDED_VERDICTS
from core.errors import DataError

TRAINED_VERDICTS = ("a", "b")  # the edited answer's side is recorded as a verdict for that side
VERDICTS = (*TRAINED_VERDICTS, *RECORDED_VERDICTS)
THUMBS_VERDICTS = ("up", "down", "skip")
THUMBS_LABELS = {"up": True, "down": False}  # a skip has no label: nothing to learn from it
PAIRS, THUMBS = "pairs", "thumbs"  # the two kinds of judgements file; a record says which (duet.mode)
TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass(frozen=True)
class PromptItem:
    """One prompt to answer: chat messages (a system turn first when there is one) and where it came from."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    location: str

    @property
    def conversation(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    @property
    def key(self) -> str:
        """The prompt's identity across runs and files: a hash of its messages."""
        return hashlib.sha256(json.dumps(self.messages, ensure_ascii=False).encode()).hexdigest()[:16]

    @property
    def text(self) -> str:
        """The last user turn: what the prompt asks."""
        return next((content for role, content in reversed(self.messages) if role == "user"), "")


def user_prompt(text: str, location: str) -> PromptItem:
    return PromptItem((("user", text),), location)


# ---------------------------------------------------------------------------------------------------------
# Prompt sources


def read_prompts(source: str | Path) -> list[PromptItem]:
    """The prompts in ``source``: a text file (one prompt per line; blank lines and lines starting with '#'
    skipped), JSON lines / JSON / parquet rows with a ``prompt`` (text or messages), ``messages`` or ShareGPT's
    ``conversations`` (the turns before the last reply), or ``instruction`` (+ ``input``), which covers the
    prompts of any preference file."""
    path = Path(source).expanduser()
    rows = [] if path.suffix.lower() in TEXT_SUFFIXES else read_rows(source)
    if path.suffix.lower() in TEXT_SUFFIXES:
        prompts = _text_prompts(path, str(source))
    else:
        prompts = [_row_prompt(raw.data, str(raw.location)) if raw.error is None else _bad_row(raw) for raw in rows]
    if not prompts:
        raise DataError(f"{source}: no prompts in it; write one prompt per line (or JSON rows with a 'prompt').")
    return prompts


def _text_prompts(path: Path, name: str) -> list[PromptItem]:
    if not path.is_file():
        raise DataError(f"{name}: no such file; give a text file with one prompt per line, or a JSON lines file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    return [
        user_prompt(line.strip(), f"{name}:{number}")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _bad_row(raw: Any) -> PromptItem:
    raise DataError(f"{raw.location}: {raw.error}")


def _row_prompt(row: Any, location: str) -> PromptItem:
    if not isinstance(row, Mapping):
        raise DataError(f"{location}: a row must be a JSON object with a 'prompt', got {type(row).__name__}.")
    system = row.get("system")
    turns: list[tuple[str, str]] = [("system", system)] if isinstance(system, str) and system.strip() else []
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            turns.append(("user", prompt))
        else:
            turns += _messages(prompt, location, "prompt")
    elif "messages" in row or "conversations" in row:  # a chat, or ShareGPT's turns
        field = "messages" if "messages" in row else "conversations"
        turns += _messages(row[field], location, field)
    elif "instruction" in row:
        extra = row.get("input") or ""
        turns.append(("user", f"{row['instruction']}\n\n{extra}".strip() if extra else str(row["instruction"])))
    else:
        raise DataError(
            f"{location}: no 'prompt' field (nor 'messages' or 'instruction'); "
            f"found {', '.join(map(str, row)) or 'none'}."
        )
    while turns and turns[-1][0] == "assistant":  # a conversation with its reply: the prompt is what precedes it
        turns.pop()
    if not any(role == "user" and content.strip() for role, content in turns):
        raise DataError(f"{location}: the prompt is empty (it has no user turn with text).")
    return PromptItem(tuple(turns), location)


def _messages(value: Any, location: str, field: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not all(isinstance(m, Mapping) for m in value):
        raise DataError(f"{location}: field '{field}' must be text or a list of {{role, content}} messages.")
    turns = []
    for number, message in enumerate(value, start=1):
        role, content = message.get("role", message.get("from")), message.get("content", message.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(f"{location}: field '{field}' message {number} needs a text 'role' and 'content'.")
        turns.append(({"human": "user", "gpt": "assistant"}.get(role, role), content))
    return turns


# ---------------------------------------------------------------------------------------------------------
# Judgement records


def judgement_record(
    prompt: PromptItem,
    answers: tuple[str, str],
    verdict: str,
    *,
    judge: str,
    provenance: Mapping[str, Any],
    edited: str | None = None,
) -> dict[str, Any]:
    """One line of a judgements file. ``verdict`` is the side preferred ("a"/"b"), or tie/both_bad/skip;
    with ``edited``, the preferred side's text was replaced by the judge's edit (it becomes chosen, over the
    other answer as generated)."""
    if verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r}")
    meta = {
        "verdict": verdict,
        "judge": judge,
        "prompt_key": prompt.key,
        "source": prompt.location,
        "answers": {"a": answers[0], "b": answers[1]} if verdict != "skip" else None,
        "edited": edited is not None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **provenance,
    }
    record: dict[str, Any] = {"prompt": prompt.conversation}
    if verdict in TRAINED_VERDICTS:
        chosen_side = 0 if verdict == "a" else 1
        chosen = edited if edited is not None else answers[chosen_side]
        record["chosen"] = [{"role": "assistant", "content": chosen}]
        record["rejected"] = [{"role": "assistant", "content": answers[1 - chosen_side]}]
    record["duet"] = meta
    return record


def thumbs_record(
    prompt: PromptItem,
    answer: str,
    verdict: str,
    *,
    judge: str,
    provenance: Mapping[str, Any],
    edited: str | None = None,
) -> dict[str, Any]:
    """One line of a thumbs file: ``verdict`` "up", "down" or "skip" on one answer. With ``edited``, the
    judge rewrote the answer: the edit is the completion, and a thumbs up (what the judge wants to read)."""
    if verdict not in THUMBS_VERDICTS:
        raise ValueError(f"unknown thumbs verdict {verdict!r}")
    if edited is not None and verdict != "up":
        raise ValueError("an edited answer is recorded as a thumbs up")
    meta = {
        "mode": THUMBS,
        "verdict": verdict,
        "judge": judge,
        "prompt_key": prompt.key,
        "source": prompt.location,
        "answer": answer if verdict != "skip" else None,  # as generated (the completion may be the edit)
        "edited": edited is not None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **provenance,
    }
    record: dict[str, Any] = {"prompt": prompt.conversation}
    if verdict in THUMBS_LABELS:
        record["completion"] = [{"role": "assistant", "content": edited if edited is not None else answer}]
        record["label"] = THUMBS_LABELS[verdict]
    record["duet"] = meta
    return record


def record_mode(record: Mapping[str, Any]) -> str:
    """Which kind of file a record belongs in: pair judgements carry no mode (they came first)."""
    return str(record["duet"].get("mode", PAIRS))


def record_prompt(record: Mapping[str, Any]) -> PromptItem:
    return PromptItem(tuple((m["role"], m["content"]) for m in record["prompt"]), str(record["duet"].get("source", "")))


class JudgementsFile:
    """The append-only judgements file: opened once, every line synced as it is written; undo truncates.
    ``mode`` is the kind of records it holds (pairs, or thumbs): a file of the other kind is refused."""

    def __init__(self, path: str | Path, mode: str = PAIRS) -> None:
        if mode not in (PAIRS, THUMBS):
            raise ValueError(f"unknown judgements file mode {mode!r}")
        self.path = Path(path).expanduser()
        self.mode = mode
        self.records: list[dict[str, Any]] = []
        self._offsets: list[int] = []  # where each record's line starts
        self.dropped_tail = False  # a line cut short by a crash was removed on opening
        self._load()
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:
            fsync_dir(self.path.parent)

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        position, end = 0, len(data)
        while position < end:
            newline = data.find(b"\n", position)
            if newline < 0:  # a line cut short by a kill while it was written: it never happened
                self._truncate(position)
                self.dropped_tail = True
                break
            raw = data[position:newline]
            line_number = data.count(b"\n", 0, position) + 1
            if raw.strip():
                number = len(self.records) + 1
                try:
                    record = json.loads(raw)
                except ValueError as exc:
                    raise DataError(
                        f"{self.path}:{line_number}: not a JSON line ({exc.msg}); this is "
                        "not a judgements file Duet wrote, or it was edited by hand. Fix or remove that line."
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get("duet"), dict) or "prompt" not in record:
                    raise DataError(
                        f"{self.path}:{line_number}: record {number} is not a Duet judgement "
                        "(no 'prompt' or 'duet' field); give a new file for --out, or one Duet collected into."
                    )
                self._check_mode(record, line_number)
                self.records.append(record)
                self._offsets.append(position)
            position = newline + 1

    def _check_mode(self, record: Mapping[str, Any], line_number: int) -> None:
        """Pairs and thumbs never mix in one file: each trains a different objective, and a resumed session
        would count the other kind's prompts as its own."""
        found = record_mode(record)
        if found == self.mode:
            return
        if found == THUMBS:
            raise DataError(
                f"{self.path}:{line_number}: this file holds thumbs-up/down ratings (duet collect --thumbs), "
                "not pair judgements. Add --thumbs to go on rating into it, or give another --out file for pairs."
            )
        raise DataError(
            f"{self.path}:{line_number}: this file holds pair judgements (which of two answers is better), not "
            "thumbs-up/down ratings. Give another --out file for --thumbs, or drop --thumbs to go on judging pairs."
        )

    def _truncate(self, size: int) -> None:
        with open(self.path, "r+b") as handle:
            handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        start = os.fstat(self._fd).st_size
        if faults.armed("collect.write"):  # killed half-way through the line
            os.write(self._fd, line[: len(line) // 2])
            faults.reach_now()
        written = os.write(self._fd, line)  # one write of the whole line: a kill never leaves half of it
        if written != len(line):  # a full disk: put the file back as it was
            os.ftruncate(self._fd, start)
            raise OSError(f"{self.path}: the disk took only {written} of {len(line)} bytes")
        os.fsync(self._fd)
        self.records.append(record)
        self._offsets.append(start)
        faults.reach("collect.written")

    def undo(self) -> dict[str, Any] | None:
        """Remove the last record from the file (and return it); None when the file holds none."""
        if not self.records:
            return None
        os.ftruncate(self._fd, self._offsets.pop())
        os.fsync(self._fd)
        return self.records.pop()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JudgementsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def counts(self) -> Counter[str]:
        return Counter(record["duet"].get("verdict", "?") for record in self.records)

    def judged_keys(self) -> Counter[str]:
        return Counter(record["duet"].get("prompt_key", "") for record in self.records)


def remaining(prompts: list[PromptItem], done: Counter[str]) -> Iterator[tuple[int, PromptItem]]:
    """(index, prompt) for the prompts not judged yet, in order; a prompt that appears twice is asked twice."""
    left = Counter(done)
    for index, prompt in enumerate(prompts):
        if left[prompt.key] > 0:
            left[prompt.key] -= 1
            continue
        yield index, prompt
