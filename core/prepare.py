"""From a data config and a tokenizer to tokenized train and eval pairs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import DataConfig
from core.data import LoadReport, PreferencePair, load_preferences
from core.errors import DataError
from core.named import NAMED_DATA
from core.token_cache import tokenize_cached
from core.tokenization import ChatTokenizer, TokenizedPair, TokenizeReport


@dataclass
class PreparedSplit:
    pairs: list[PreferencePair]  # as loaded (indexed by TokenizedPair.index)
    tokenized: list[TokenizedPair]
    load_report: LoadReport
    tokenize_report: TokenizeReport
    from_cache: bool = False  # the tokens came from the tokenization cache


@dataclass
class PreparedData:
    chat: ChatTokenizer
    train: PreparedSplit
    eval: PreparedSplit | None


def resolve_data_source(source: str) -> str:
    if source in NAMED_DATA:  # "demo"
        return str(NAMED_DATA[source]())
    return source


Progress = Callable[[str], Callable[[int, int], None]]  # split name → progress(done, total) of its tokenization


def _load_split(
    source: str, config: DataConfig, chat: ChatTokenizer, cache_dir: Path | None, progress: Progress | None
) -> PreparedSplit:
    pairs, load_report = load_preferences(
        resolve_data_source(source),
        drop_duplicates=config.drop_duplicates,
        format=config.format,
        columns=config.columns,
        split=config.split,
        skip_invalid=config.skip_invalid,
    )
    tokenized, tokenize_report, cached = tokenize_cached(
        pairs,
        chat,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        skip_invalid=config.skip_invalid,
        cache_dir=cache_dir,
        progress=None if progress is None else progress(source),
    )
    if not tokenized and tokenize_report.skipped_template_errors:
        raise DataError(
            f"{source}: the chat template rejected all {tokenize_report.skipped_template_errors} pairs; "
            "run `duet inspect` without --skip-invalid to see the first error."
        )
    if not tokenized:
        raise DataError(
            f"{source}: no pair is left after tokenization ({tokenize_report.dropped_no_response} lost "
            f"their replies to truncation at data.max_length={config.max_length}, "
            f"data.max_prompt_length={config.max_prompt_length}). Raise max_length or lower "
            "max_prompt_length; `duet inspect` shows the lengths."
        )
    return PreparedSplit(pairs, tokenized, load_report, tokenize_report, cached)


def prepare_data(
    config: DataConfig, tokenizer: Any, seed: int, cache_dir: Path | None = None, progress: Progress | None = None
) -> PreparedData:
    """Load, check and tokenize the train (and eval) data; ``cache_dir`` keeps the tokens for the next run;
    ``progress(source)`` gives the callback that follows one file's tokenization."""
    chat = ChatTokenizer(tokenizer, config.chat_template)
    train = _load_split(config.train, config, chat, cache_dir, progress)
    evaluation = None
    if config.eval:
        evaluation = _load_split(config.eval, config, chat, cache_dir, progress)
    elif config.eval_fraction > 0:
        count = len(train.tokenized)
        held_out = min(count - 1, max(1, round(config.eval_fraction * count)))
        if held_out < 1:
            raise DataError(
                f"{config.train}: {count} pair(s) are too few to hold out data.eval_fraction="
                f"{config.eval_fraction} for evaluation; add pairs or set data.eval_fraction=0."
            )
        order = np.random.default_rng([seed, 0xE7A1]).permutation(count)  # not the stream batch plans use
        chosen = set(order[:held_out].tolist())
        evaluation = PreparedSplit(
            train.pairs,
            [p for i, p in enumerate(train.tokenized) if i in chosen],
            train.load_report,
            train.tokenize_report,
            train.from_cache,
        )
        train = PreparedSplit(
            train.pairs,
            [p for i, p in enumerate(train.tokenized) if i not in chosen],
            train.load_report,
            train.tokenize_report,
            train.from_cache,
        )
    return PreparedData(chat, train, evaluation)
