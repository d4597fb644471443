"""From a data config and a tokenizer to tokenized train and eval pairs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import DataConfig, ObjectiveConfig
from core.data import LoadReport, PreferencePair, load_preferences
from core.data.unpaired import balance_advice, split_pairs, with_mismatched_replies
from core.errors import DataError
from core.named import NAMED_DATA
from core.objectives import OBJECTIVES
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


def unpaired_needs(objective: ObjectiveConfig) -> Unpaired | None:
    """What ``objective`` asks of the data when it trains on unpaired examples; None for a pairwise one."""
    if not OBJECTIVES[objective.name].unpaired:
        return None
    return Unpaired(objective.name, objective.desirable_weight or 1.0, objective.undesirable_weight or 1.0)


def resolve_data_source(source: str) -> str:
    if source in NAMED_DATA:  # "demo"
        return str(NAMED_DATA[source]())
    return source


Progress = Callable[[str], Callable[[int, int], None]]  # split name → progress(done, total) of its tokenization


def _load_split(
    source: str,
    config: DataConfig,
    chat: ChatTokenizer,
    cache_dir: Path | None,
    progress: Progress | None,
    unpaired: Unpaired | None,
    seed: int,
) -> PreparedSplit:
    pairs, load_report = load_preferences(
        resolve_data_source(source),
        drop_duplicates=config.drop_duplicates,
        format=config.format,
        columns=config.columns,
        split=config.split,
        skip_invalid=config.skip_invalid,
    )
    pairs = _as_objective_needs(pairs, load_report, source, config, unpaired, seed)
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
    for example in tokenized:  # the rating is no part of the tokens (nor of their cache)
        example.label = pairs[example.index].label
    return PreparedSplit(pairs, tokenized, load_report, tokenize_report, cached)


@dataclass(frozen=True)
class Unpaired:
    """What an objective trained on unpaired examples (KTO) asks of the data: its class weights λ_D, λ_U."""

    objective: str
    desirable_weight: float
    undesirable_weight: float


def _as_objective_needs(
    pairs: list[PreferencePair],
    report: LoadReport,
    source: str,
    config: DataConfig,
    unpaired: Unpaired | None,
    seed: int,
) -> list[PreferencePair]:
    """Pairs for a pairwise objective; rated examples, each with a mismatched reply, for an unpaired one."""
    given_unpaired = bool(pairs) and pairs[0].is_unpaired
    if unpaired is None:
        if given_unpaired:
            raise DataError(
                f"{source}: its rows are unpaired examples (prompt, completion, label), which a pairwise "
                "objective cannot train on. Train them with objective.name=kto, or give preference pairs."
            )
        return pairs
    if not given_unpaired:
        if not config.unpaired:
            raise DataError(
                f"{source}: objective {unpaired.objective} trains on unpaired examples (prompt, completion, "
                "label: true|false), and these rows are preference pairs. Set data.unpaired=true to split each "
                "pair into a desirable (chosen) and an undesirable (rejected) example, or give unpaired rows."
            )
        pairs = split_pairs(pairs)
    report.desirable = sum(1 for p in pairs if p.label)
    report.undesirable = len(pairs) - report.desirable
    report.pairs = len(pairs)
    advice = balance_advice(
        report.desirable, report.undesirable, unpaired.desirable_weight, unpaired.undesirable_weight
    )
    if advice:
        report.warnings.append(advice)
    if len({(p.system, p.prompt) for p in pairs}) < 2:
        report.warnings.append(
            "every example has the same prompt: KTO's KL baseline is then estimated on replies to that same "
            "prompt, not on mismatched ones; add examples with other prompts."
        )
    return with_mismatched_replies(pairs, seed)


def prepare_data(
    config: DataConfig,
    tokenizer: Any,
    seed: int,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    unpaired: Unpaired | None = None,
) -> PreparedData:
    """Load, check and tokenize the train (and eval) data; ``cache_dir`` keeps the tokens for the next run;
    ``progress(source)`` gives the callback that follows one file's tokenization; ``unpaired``: the objective
    trains on rated examples (see ``unpaired_needs``)."""
    chat = ChatTokenizer(tokenizer, config.chat_template)
    train = _load_split(config.train, config, chat, cache_dir, progress, unpaired, seed)
    evaluation = None
    if config.eval:
        evaluation = _load_split(config.eval, config, chat, cache_dir, progress, unpaired, seed + 1)
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
