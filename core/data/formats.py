"""Detect a row's preference format and normalize it into a ``PreferencePair``.

Each format is one small normalizer. A row that does not fit raises ``RowError`` naming the field, so the
loader can report ``file:line: field 'chosen': ...`` or skip the row when asked to. Messages and parts inside a
field are named by their index, counted from 0 as in the JSON: ``chosen[2]`` is the third message of chosen.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from core.data.records import Message

# Role spellings seen in the wild, mapped to the chat-template roles.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


class RowError(Exception):
    """A row that cannot be normalized. ``kind`` groups errors in the skip report."""

    def __init__(self, field: str | None, message: str, kind: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.kind = kind


@dataclass(frozen=True)
class PairParts:
    """What a normalizer returns; the loader adds the location."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    system: str | None = None
    score_chosen: float | None = None
    score_rejected: float | None = None
    label: bool | None = None  # the unpaired format: the rating of ``chosen`` (``rejected`` is empty)


@dataclass(frozen=True)
class Format:
    name: str
    shape: str  # shown to users: what the rows of this format look like
    matches: Callable[[Mapping[str, Any]], bool]
    normalize: Callable[[Mapping[str, Any]], PairParts]


# ---------------------------------------------------------------------------------------------------------
# Field helpers


def _require(row: Mapping[str, Any], field: str) -> Any:
    if field not in row or row[field] is None:
        raise RowError(field, f"missing field '{field}'", "missing field")
    return row[field]


def _text(value: Any, field: str) -> str:
    """A message content: a string, or a list of text parts (OpenAI / LLaMA-Factory style)."""
    if isinstance(value, str):
        return _valid_unicode(value, field)
    if isinstance(value, list):
        pieces = []
        for index, part in enumerate(value):
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                text = part.get("text", part.get("value"))
                if not isinstance(text, str):
                    raise RowError(f"{field}[{index}]", "a text part has no string 'text' or 'value'", "wrong type")
                pieces.append(text)
            elif isinstance(part, Mapping):
                raise RowError(
                    f"{field}[{index}]",
                    f"a part of type '{part.get('type')}' is not text; only text is supported",
                    "wrong type",
                )
            else:
                raise RowError(f"{field}[{index}]", f"expected a text part, got {type(part).__name__}", "wrong type")
        return _valid_unicode("".join(pieces), field)
    raise RowError(field, f"expected a string, got {_type_name(value)}", "wrong type")


def _valid_unicode(text: str, field: str) -> str:
    """JSON can spell text that is not Unicode (a lone surrogate escape such as \\ud800); tokenizers cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(
            field,
            f"contains a character that is not valid Unicode ({text[exc.start]!a}, a lone "
            f"surrogate from a broken \\u escape) at position {exc.start}",
            "invalid text",
        ) from None
    return text


def _non_empty_text(value: Any, field: str) -> str:
    text = _text(value, field)
    if not text.strip():
        raise RowError(field, f"field '{field}' is empty", "empty field")
    return text


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _message(value: Any, field: str) -> Message:
    if not isinstance(value, Mapping):
        raise RowError(
            field, f"expected a message object with 'role' and 'content', got {_type_name(value)}", "wrong type"
        )
    role_key = "role" if "role" in value else "from" if "from" in value else None
    content_key = "content" if "content" in value else "value" if "value" in value else None
    if role_key is None:
        raise RowError(field, "the message has no 'role' (or 'from')", "missing field")
    if content_key is None:
        raise RowError(field, "the message has no 'content' (or 'value')", "missing field")
    raw_role = value[role_key]
    role = ROLE_ALIASES.get(raw_role.lower()) if isinstance(raw_role, str) else None
    if role is None:
        known = ", ".join(sorted(ROLE_ALIASES))
        raise RowError(f"{field}.{role_key}", f"unknown role {raw_role!r}; expected one of {known}", "unknown role")
    content = _text(value[content_key], f"{field}.{content_key}")
    if not content.strip() and role != "assistant":
        raise RowError(f"{field}.{content_key}", f"the {role} message is empty", "empty field")
    return Message(role, content)


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of messages, got {_type_name(value)}", "wrong type")
    if not value:
        raise RowError(field, f"field '{field}' is an empty list", "empty field")
    return [_message(item, f"{field}[{index}]") for index, item in enumerate(value)]


def _reply(value: Any, field: str) -> str:
    """One assistant reply given as a string, a message, or a one-message list."""
    if isinstance(value, str):
        return _non_empty_text(value, field)
    if isinstance(value, Mapping):
        message = _message(value, field)
    elif isinstance(value, list):
        messages = _messages(value, field)
        if len(messages) != 1:
            raise RowError(field, f"expected one assistant message, got {len(messages)} messages", "wrong type")
        message = messages[0]
    else:
        raise RowError(field, f"expected a string or an assistant message, got {_type_name(value)}", "wrong type")
    if message.role != "assistant":
        raise RowError(field, f"the reply must come from the assistant, not '{message.role}'", "wrong role")
    return _non_empty_text(message.content, field)


def _optional_system(row: Mapping[str, Any], field: str = "system") -> str | None:
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _text(value, field)


def _score(row: Mapping[str, Any], field: str) -> float | None:
    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(field, f"expected a number, got {_type_name(value)}", "wrong type")
    if not math.isfinite(value):
        raise RowError(field, f"expected a finite number, got {value}", "wrong type")
    return float(value)


def _split_last_reply(messages: list[Message], field: str) -> tuple[list[Message], str]:
    """A full conversation → (the turns before the last assistant reply, that reply)."""
    last = messages[-1]
    if last.role != "assistant":
        raise RowError(
            f"{field}[{len(messages) - 1}]",
            f"the conversation must end with the assistant's reply, not a '{last.role}' turn",
            "wrong role",
        )
    return messages[:-1], _non_empty_text(last.content, f"{field}[{len(messages) - 1}].content")


def _shared_prompt(
    chosen: list[Message], rejected: list[Message], chosen_field: str, rejected_field: str
) -> tuple[list[Message], str, str]:
    """Implicit prompt: the shared prefix of two conversations, up to their last assistant turns."""
    chosen_prompt, chosen_reply = _split_last_reply(chosen, chosen_field)
    rejected_prompt, rejected_reply = _split_last_reply(rejected, rejected_field)
    if chosen_prompt != rejected_prompt:
        differ = next(
            (i for i, (a, b) in enumerate(zip(chosen_prompt, rejected_prompt, strict=False)) if a != b),
            min(len(chosen_prompt), len(rejected_prompt)),
        )
        raise RowError(
            f"{chosen_field}/{rejected_field}",
            f"'{chosen_field}' and '{rejected_field}' share no prompt: they differ at {chosen_field}[{differ}] / "
            f"{rejected_field}[{differ}], before the final replies",
            "no shared prompt",
        )
    if not chosen_prompt:
        raise RowError(chosen_field, "the conversation has no prompt before the assistant's reply", "empty field")
    return chosen_prompt, chosen_reply, rejected_reply


def _finish(
    prompt: list[Message],
    chosen: str,
    rejected: str,
    system: str | None = None,
    score_chosen: float | None = None,
    score_rejected: float | None = None,
) -> PairParts:
    """Checks shared by every format: one system message, a prompt that asks, two different replies."""
    if prompt and prompt[0].role == "system":
        if system is not None:
            raise RowError("system", "both a 'system' field and a system turn in the prompt", "ambiguous")
        system, prompt = prompt[0].content, prompt[1:]
    if not any(message.role == "user" for message in prompt):
        raise RowError("prompt", "the prompt has no user turn", "empty field")
    if prompt[-1].role == "assistant":
        raise RowError(
            "prompt",
            "the prompt ends with an assistant turn; the last prompt turn must be the user's (or a tool's)",
            "wrong role",
        )
    if chosen == rejected:
        raise RowError("chosen/rejected", "'chosen' and 'rejected' are identical", "identical replies")
    return PairParts(tuple(prompt), chosen, rejected, system, score_chosen, score_rejected)


# ---------------------------------------------------------------------------------------------------------
# The formats


def _normalize_explicit(row: Mapping[str, Any]) -> PairParts:
    prompt = _non_empty_text(_require(row, "prompt"), "prompt")
    return _finish(
        [Message("user", prompt)],
        _reply(_require(row, "chosen"), "chosen"),
        _reply(_require(row, "rejected"), "rejected"),
        _optional_system(row),
    )


def _prompt_turns(row: Mapping[str, Any]) -> list[Message]:
    """The ``prompt`` field: one user turn given as text, or the turns as messages."""
    raw_prompt = _require(row, "prompt")
    if isinstance(raw_prompt, str):
        return [Message("user", _non_empty_text(raw_prompt, "prompt"))]
    return _messages(raw_prompt, "prompt")


def _normalize_conversational(row: Mapping[str, Any]) -> PairParts:
    prompt = _prompt_turns(row)
    return _finish(
        prompt,
        _reply(_require(row, "chosen"), "chosen"),
        _reply(_require(row, "rejected"), "rejected"),
        _optional_system(row),
    )


def _normalize_implicit(
    row: Mapping[str, Any], chosen_field: str = "chosen", rejected_field: str = "rejected"
) -> PairParts:
    chosen = _messages(_require(row, chosen_field), chosen_field)
    rejected = _messages(_require(row, rejected_field), rejected_field)
    prompt, chosen_reply, rejected_reply = _shared_prompt(chosen, rejected, chosen_field, rejected_field)
    return _finish(prompt, chosen_reply, rejected_reply, _optional_system(row))


def _normalize_ultrafeedback(row: Mapping[str, Any]) -> PairParts:
    _non_empty_text(_require(row, "prompt"), "prompt")
    parts = _normalize_implicit(row)
    return PairParts(
        parts.prompt,
        parts.chosen,
        parts.rejected,
        parts.system,
        _score(row, "score_chosen"),
        _score(row, "score_rejected"),
    )


def _normalize_llamafactory_v1(row: Mapping[str, Any]) -> PairParts:
    return _normalize_implicit(row, "chosen_messages", "rejected_messages")


def _normalize_sharegpt(row: Mapping[str, Any]) -> PairParts:
    prompt = _messages(_require(row, "conversations"), "conversations")
    return _finish(
        prompt,
        _reply(_require(row, "chosen"), "chosen"),
        _reply(_require(row, "rejected"), "rejected"),
        _optional_system(row),
    )


def _normalize_alpaca(row: Mapping[str, Any]) -> PairParts:
    instruction = _non_empty_text(_require(row, "instruction"), "instruction")
    extra = row.get("input")
    if extra is not None and _text(extra, "input").strip():
        instruction = f"{instruction}\n{_text(extra, 'input')}"
    history: list[Message] = []
    raw_history = row.get("history") or []
    if not isinstance(raw_history, list):
        raise RowError(
            "history", f"expected a list of [question, answer] pairs, got {_type_name(raw_history)}", "wrong type"
        )
    for index, turn in enumerate(raw_history):
        if not (isinstance(turn, list) and len(turn) == 2):
            raise RowError(f"history[{index}]", "expected a [question, answer] pair", "wrong type")
        history += [
            Message("user", _text(turn[0], f"history[{index}][0]")),
            Message("assistant", _text(turn[1], f"history[{index}][1]")),
        ]
    return _finish(
        [*history, Message("user", instruction)],
        _reply(_require(row, "chosen"), "chosen"),
        _reply(_require(row, "rejected"), "rejected"),
        _optional_system(row),
    )


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_messages(transcript: Any, field: str) -> list[Message]:
    text = _non_empty_text(transcript, field)
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    pieces = _HH_TURN.split(text)
    if len(pieces) < 3:
        raise RowError(
            field, "expected an HH-RLHF transcript with '\\n\\nHuman:' and '\\n\\nAssistant:' turns", "wrong type"
        )
    if pieces[0].strip():
        raise RowError(field, "the transcript has text before its first 'Human:' turn", "wrong type")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [Message(roles[speaker], body.strip()) for speaker, body in zip(pieces[1::2], pieces[2::2], strict=True)]


def _normalize_hh_rlhf(row: Mapping[str, Any]) -> PairParts:
    chosen = _hh_messages(_require(row, "chosen"), "chosen")
    rejected = _hh_messages(_require(row, "rejected"), "rejected")
    prompt, chosen_reply, rejected_reply = _shared_prompt(chosen, rejected, "chosen", "rejected")
    return _finish(prompt, chosen_reply, rejected_reply)


def _label(row: Mapping[str, Any]) -> bool:
    value = _require(row, "label")
    if not isinstance(value, bool):
        raise RowError(
            "label",
            f"expected true (a desirable reply) or false (an undesirable one), got {_type_name(value)} {value!r}",
            "wrong type",
        )
    return value


def _normalize_unpaired(row: Mapping[str, Any]) -> PairParts:
    """One rated reply (TRL's unpaired preference format), text or messages."""
    prompt = _prompt_turns(row)
    completion = _reply(_require(row, "completion"), "completion")
    label = _label(row)
    parts = _finish(prompt, completion, "", _optional_system(row))
    return PairParts(parts.prompt, parts.chosen, "", parts.system, label=label)


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) for m in value)


def _has_prompt_turns(value: Any) -> bool:
    return _is_message_list(value) and any(
        str(m.get("role", m.get("from", ""))).lower() in ("user", "human") for m in value
    )


FORMATS: tuple[Format, ...] = (
    Format(
        "unpaired",
        "{prompt: str or [messages], completion: str or [assistant message], label: true|false} (KTO)",
        lambda r: "completion" in r and "chosen" not in r and "rejected" not in r,
        _normalize_unpaired,
    ),
    Format(
        "sharegpt",
        "{conversations: [{from, value}...], chosen: {from, value}, rejected: {from, value}}",
        lambda r: "conversations" in r and "chosen" in r and "rejected" in r,
        _normalize_sharegpt,
    ),
    Format(
        "llamafactory_v1",
        "{chosen_messages: [{role, content: [{type, value}]}...], rejected_messages: [...]}",
        lambda r: "chosen_messages" in r and "rejected_messages" in r,
        _normalize_llamafactory_v1,
    ),
    Format(
        "ultrafeedback",
        "{prompt: str, chosen: [messages incl. the prompt], rejected: [...], score_*}",
        lambda r: isinstance(r.get("prompt"), str) and _has_prompt_turns(r.get("chosen")),
        _normalize_ultrafeedback,
    ),
    Format(
        "conversational",
        "{prompt: [messages], chosen: [assistant message], rejected: [...]}",
        lambda r: "prompt" in r and (_is_message_list(r.get("prompt")) or _is_message_list(r.get("chosen"))),
        _normalize_conversational,
    ),
    Format(
        "explicit",
        "{prompt: str, chosen: str, rejected: str, system?: str}",
        lambda r: "prompt" in r and "chosen" in r and "rejected" in r,
        _normalize_explicit,
    ),
    Format(
        "alpaca",
        "{instruction: str, input?: str, chosen: str, rejected: str, history?, system?}",
        lambda r: "instruction" in r and "chosen" in r and "rejected" in r,
        _normalize_alpaca,
    ),
    Format(
        "implicit",
        "{chosen: [full conversation], rejected: [full conversation]}",
        lambda r: _is_message_list(r.get("chosen")) and "rejected" in r and "prompt" not in r,
        _normalize_implicit,
    ),
    Format(
        "hh_rlhf",
        "{chosen: '\\n\\nHuman: ...\\n\\nAssistant: ...', rejected: '...'}",
        lambda r: isinstance(r.get("chosen"), str) and "rejected" in r and "prompt" not in r,
        _normalize_hh_rlhf,
    ),
)
FORMATS_BY_NAME = {fmt.name: fmt for fmt in FORMATS}


def detect_format(row: Mapping[str, Any]) -> Format | None:
    """The first format whose shape the row has (most specific formats come first)."""
    return next((fmt for fmt in FORMATS if fmt.matches(row)), None)


def known_formats_text() -> str:
    return "\n".join(f"  - {fmt.name}: {fmt.shape}" for fmt in FORMATS)
