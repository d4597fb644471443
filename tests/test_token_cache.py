"""The token cache returns exactly what tokenizing afresh would, including for templates that read the clock."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
import transformers.utils.chat_template_utils as chat_template_utils

from core.data import Message, PreferencePair
from core.token_cache import tokenize_cached
from core.tokenization import ChatTokenizer
from tests.test_tokenization import bos_tokenizer

# Like Llama 3.x: today's date is written into the system turn.
DATED_TEMPLATE = (
    "{{ bos_token }}<|system|>Cutting Knowledge Date: December 2023\nToday Date: {{ strftime_now('%d %b %Y') }}\n"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PAIRS = [PreferencePair((Message("user", "What is two plus two?"),), "It is four.", "Hello there.")]


def on_day(monkeypatch: pytest.MonkeyPatch, day: datetime) -> None:
    """transformers' strftime_now reads the clock through its module's ``datetime``."""

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return day

    monkeypatch.setattr(chat_template_utils, "datetime", Clock)


def cached(chat: ChatTokenizer, cache: Path):
    return tokenize_cached(PAIRS, chat, max_length=128, max_prompt_length=None, skip_invalid=False, cache_dir=cache)


def test_a_template_that_renders_the_date_misses_the_cache_on_another_day(tmp_path, monkeypatch) -> None:
    chat = ChatTokenizer(bos_tokenizer(DATED_TEMPLATE))
    on_day(monkeypatch, datetime(2026, 11, 28))
    first, _, hit = cached(chat, tmp_path)
    assert not hit and "28 Nov 2026" in chat.tokenizer.decode(list(first[0].prompt_ids))
    assert cached(chat, tmp_path)[2]  # the same day: a hit
    on_day(monkeypatch, datetime(2026, 11, 29))
    again, _, hit = cached(chat, tmp_path)
    assert not hit, "a cache hit on another day would return yesterday's date in the tokens"
    assert "29 Nov 2026" in chat.tokenizer.decode(list(again[0].prompt_ids))
    assert list(again[0].prompt_ids) != list(first[0].prompt_ids)


def test_a_template_without_a_clock_hits_across_days(tmp_path, monkeypatch) -> None:
    chat = ChatTokenizer(bos_tokenizer(DATED_TEMPLATE.replace("{{ strftime_now('%d %b %Y') }}", "26 Jul 2024")))
    on_day(monkeypatch, datetime(2026, 11, 28))
    assert not cached(chat, tmp_path)[2]
    on_day(monkeypatch, datetime(2026, 11, 29))
    assert cached(chat, tmp_path)[2]
