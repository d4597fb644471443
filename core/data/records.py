"""The one record every preference format is normalized into."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# verdicts a judgements file records (with the answers) but that are no preference: never trained on
RECORDED_VERDICTS = ("tie", "both_bad", "skip")


@dataclass(frozen=True)
class Location:
    """Where a row came from, for error messages: ``file:line`` or ``file row N``."""

    source: str
    line: int | None = None  # 1-based physical line (JSON lines, or the line a JSON array element starts on)
    row: int | None = None  # 1-based row number (parquet, hub datasets), used when there is no line

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}"
        if self.row is not None:
            return f"{self.source} row {self.row}"
        return self.source


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (all its turns, and an optional system message) with a preferred and a dispreferred reply.

    An unpaired example (KTO: one reply rated desirable or not) is held in the same shape, so it is
    tokenized, batched, cached and prefix-shared as a pair is: ``chosen`` is the rated reply, ``label`` its
    rating, and ``rejected`` the reply of another example, the mismatched sample KTO's KL baseline is
    estimated on (see ``core.data.unpaired``)."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    system: str | None = None
    location: Location | None = field(default=None, compare=False)
    score_chosen: float | None = field(default=None, compare=False)
    score_rejected: float | None = field(default=None, compare=False)
    label: bool | None = None  # unpaired examples only: True desirable (thumbs-up), False undesirable

    @property
    def is_unpaired(self) -> bool:
        return self.label is not None

    def conversation(self) -> list[dict[str, str]]:
        """The prompt as chat-template messages, system turn first when there is one."""
        messages = [Message("system", self.system)] if self.system is not None else []
        return [m.as_dict() for m in (*messages, *self.prompt)]

    @property
    def num_user_turns(self) -> int:
        return sum(m.role == "user" for m in self.prompt)


def is_untrained_judgement(row: Any) -> bool:
    """A row of a judgements file (core.collect) that records a tie, "both bad" or a skip."""
    if not isinstance(row, Mapping) or not isinstance(row.get("duet"), Mapping):
        return False
    return row["duet"].get("verdict") in RECORDED_VERDICTS and "chosen" not in row
