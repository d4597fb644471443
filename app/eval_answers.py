"""The answers ``duet eval`` compares: generated in batches with per-prompt seeds, kept in a cache, and scored
under the tuned and the base model for the KL estimate."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.collect import AnswerSampler, weights_fingerprint
from core.atomic import write_json
from core.batching import collate
from core.collect import PromptItem
from core.config import Config, SamplingConfig
from core.errors import DataError
from core.fingerprint import cache_root, combine
from core.tokenization import ChatTokenizer, TokenizedPair

CHUNK_PROMPTS = 8  # prompts whose answers are generated in one batch
LOGPS_PAIRS = 8  # rows scored together for KL: 2 × this


@dataclass
class AnswerSet:
    """Every prompt's answers from one model: texts, token ids, and whether each ended before the limit."""

    texts: list[list[str]]
    tokens: list[list[list[int]]]
    finished: list[list[bool]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat_tokens(self) -> list[list[int]]:
        return [t for row in self.tokens for t in row]

    def flat_finished(self) -> list[bool]:
        return [f for row in self.finished for f in row]


def kl_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """Plain sampling from the model's distribution (temperature 1, no truncation, no penalty): what an
    unbiased Monte-Carlo estimate of KL(tuned ‖ base) needs."""
    return dataclasses.replace(
        sampling, temperature=1.0, second_temperature=None, top_p=1.0, top_k=0, repetition_penalty=1.0
    )


class AnswerCache:
    """Answers kept under the cache folder, keyed by everything that decides them."""

    def __init__(self, config: Config) -> None:
        self._cache = cache_root(config.train.cache_dir)
        self.folder = self._cache / "eval-answers"

    def fingerprint(self, location: str | Path | None) -> str:
        """A folder's weights hash; anything else (a registry name) as it is."""
        return weights_fingerprint(location, self._cache) or str(location or "none")

    def key(
        self,
        backend: str,
        model: str,
        adapter: str | Path | None,
        prompts: list[PromptItem],
        sampling: SamplingConfig,
        n: int,
        attempt: int,
    ) -> str:
        return combine(
            "duet-eval-answers-v1",
            backend,  # torch and MLX draw different answers from one seed
            self.fingerprint(model),
            self.fingerprint(adapter) if adapter else "no adapter",
            *[p.key for p in prompts],
            json.dumps(dataclasses.asdict(sampling), sort_keys=True),
            str(n),
            str(attempt),
        )

    def get(self, key: str) -> AnswerSet | None:
        path = self.folder / f"{key[:32]}.json"
        if not path.is_file():
            return None
        try:
            return AnswerSet(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            return None  # a damaged entry is regenerated

    def put(self, key: str, answers: AnswerSet) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / f"{key[:32]}.json", answers.to_dict())


def generate_answers(
    sampler: AnswerSampler,
    prompts: list[PromptItem],
    n: int,
    attempt: int,
    progress: Callable[[int, int], None] | None = None,
) -> AnswerSet:
    """``n`` answers per prompt, each seeded by (sampling.seed, prompt, attempt, i): the same seeds for every
    model compared (common random numbers: the comparison's noise is the models', not the draws')."""
    limit = sampler.sampling.max_new_tokens
    texts: list[list[str]] = []
    tokens: list[list[list[int]]] = []
    finished: list[list[bool]] = []
    for start in range(0, len(prompts), CHUNK_PROMPTS):
        chunk = [
            sampler.start(p, start + i, k=n, attempt=attempt)
            for i, p in enumerate(prompts[start : start + CHUNK_PROMPTS])
        ]
        for answers in chunk:  # start() draws alternating temperatures for a pair; every answer here uses the first
            answers.temperatures = [sampler.sampling.temperature] * n
        sampler.fill_many(chunk)
        for answers in chunk:
            if answers.error:
                raise DataError(answers.error)
            texts.append(list(answers.texts))
            tokens.append([list(t) for t in answers.token_ids])
            finished.append([len(t) < limit for t in answers.token_ids])
        if progress is not None:
            progress(min(start + CHUNK_PROMPTS, len(prompts)), len(prompts))
    return AnswerSet(texts, tokens, finished)


def answer_logps(
    backend: Any,
    chat: ChatTokenizer,
    prompt_ids: list[list[int]],
    answers: list[list[int]],
    finished: list[bool],
    *,
    adapter: bool,
) -> np.ndarray:
    """log π(answer | prompt) of each answer, its end included: an answer that stopped did so on one of the
    stop tokens, and the event "it ends here" has probability Σ over stop ids, so a finished answer scores
    log π(y) + log Σ_s π(s | y) (exact, whichever stop token the sampler drew)."""
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for index, (prompt, tokens, ended) in enumerate(zip(prompt_ids, answers, finished, strict=True)):
        scored = [[*tokens, stop] for stop in chat.stop_ids] if ended else [tokens]
        groups.setdefault(tuple(prompt), []).extend((index, t) for t in scored)
    # a pair's two replies share its prompt: rows of one prompt go two by two (an odd one out is paired with
    # itself and counted once)
    pairs: list[TokenizedPair] = []
    owners: list[tuple[int, int | None]] = []
    for prompt, rows in groups.items():
        prompt_array = np.array(prompt, dtype=np.int32)
        for j in range(0, len(rows), 2):
            first = rows[j]
            second = rows[j + 1] if j + 1 < len(rows) else None
            other = first if second is None else second
            pairs.append(
                TokenizedPair(
                    len(pairs), prompt_array, np.array(first[1], dtype=np.int32), np.array(other[1], dtype=np.int32)
                )
            )
            owners.append((first[0], None if second is None else second[0]))
    totals = np.full(len(answers), -np.inf)
    for start in range(0, len(pairs), LOGPS_PAIRS):
        chunk = pairs[start : start + LOGPS_PAIRS]
        values = np.asarray(backend.sequence_logps(collate(chunk, chat.pad_id), adapter=adapter), dtype=np.float64)
        for k, (chosen, rejected) in enumerate(owners[start : start + LOGPS_PAIRS]):
            totals[chosen] = np.logaddexp(totals[chosen], values[k])
            if rejected is not None:
                totals[rejected] = np.logaddexp(totals[rejected], values[len(chunk) + k])
    return totals
