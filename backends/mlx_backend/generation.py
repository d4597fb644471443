"""Batched sampling on MLX: several answers decoded together by mlx-lm's ``BatchGenerator``, each row with its
own seed and settings.

mlx-lm's samplers draw from MLX's global generator, so rows decoded in one batch would share one random stream
and a row's answer would depend on what it was batched with. Each sampled row here has a sampler of its own:
mlx-lm's top-p and top-k filters, then a categorical draw with the row's own key, split once per token. That
key chain is the one ``mx.random.seed(seed)`` starts and mlx-lm's ``make_sampler`` splits, so an answer is the
one this backend sampled when it generated one row at a time (tests compare the two).

Each distinct prompt is prefilled once and alone (both answers of a pair share their prompt, and a prefill on
its own rounds exactly as an unbatched one does); mlx-lm merges the prefilled caches into one left-padded
``BatchKVCache``, decodes every row in one forward per token, and drops a row from the batch when it stops.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import apply_top_k, apply_top_p, greedy_sampler

from core.sampling import RowSampling

PREFILL_CHUNK = 2048  # prompt tokens per forward in the prefill (mlx-lm's generate_step default)

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


class RowSampler:
    """One row's next token from its log-probs ([1, vocab]): top-p, then top-k (mlx-lm's order and filters),
    then a Gumbel-max draw at the row's temperature with the next key of the row's own chain."""

    def __init__(self, row: RowSampling) -> None:
        self.row = row
        self.key = mx.random.key(row.seed)

    def __call__(self, logprobs: mx.array) -> mx.array:
        # the split mx.random.seed's global generator does per draw: (next state, this draw's key)
        self.key, draw = mx.random.split(self.key)
        scores = logprobs
        if 0 < self.row.top_p < 1.0:
            scores = apply_top_p(scores, self.row.top_p)
        if 0 < self.row.top_k < scores.shape[-1]:
            scores = apply_top_k(scores, self.row.top_k)
        return mx.random.categorical(scores * (1.0 / self.row.temperature), key=draw)


def row_sampler(row: RowSampling) -> Sampler:
    """Greedy rows share mlx-lm's own argmax sampler: a batch of only greedy rows is then chosen in one call."""
    return greedy_sampler if row.temperature <= 0 else RowSampler(row)


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """transformers' repetition penalty over every token seen (prompt and answer); mlx-lm's own looks at the
    last 20 tokens only. The same settings give the same answers on both backends."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        seen = mx.zeros((logits.shape[-1],), dtype=mx.bool_)
        seen[tokens.reshape(-1)] = True
        penalized = mx.where(logits < 0, logits * penalty, logits / penalty)
        return mx.where(seen, penalized, logits)

    return process


def row_processors(row: RowSampling) -> list[LogitsProcessor]:
    return [repetition_penalty(row.repetition_penalty)] if row.repetition_penalty != 1.0 else []


def sample(
    model: Any,
    prompts: list[list[int]],
    rows: list[RowSampling],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    stream: Callable[[int, int], None] | None = None,
    batched: bool = True,
) -> list[list[int]]:
    """The tokens generated after each prompt, each row stopping at its first stop id (not included) or after
    ``max_new_tokens``; ``stream(row, token)`` as each token is made. ``batched`` False (or a model mlx-lm cannot
    batch) generates one row at a time, with the same answers."""
    if any(not prompt for prompt in prompts):
        raise ValueError("generation needs a non-empty prompt for every row")
    if max_new_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    if not (batched and batchable(model)):
        return sample_one_by_one(model, prompts, rows, max_new_tokens=max_new_tokens, stop_ids=stop_ids, stream=stream)
    return _sample_batched(model, prompts, rows, max_new_tokens=max_new_tokens, stop_ids=stop_ids, stream=stream)


def batchable(model: Any) -> bool:
    """Whether the installed mlx-lm decodes rows of this model together with per-row samplers: its
    ``BatchGenerator`` takes prefilled caches and per-row samplers (0.32 does; older ones may not), and every
    layer's cache merges into a batch cache (not every special cache does)."""
    try:
        from mlx_lm.generate import BatchGenerator
    except ImportError:
        return False
    wanted = {"caches", "all_tokens", "samplers", "logits_processors"}
    if not wanted <= set(inspect.signature(BatchGenerator.insert).parameters):
        return False
    return all(hasattr(layer, "merge") for layer in make_prompt_cache(model))


def prefill(model: Any, prompt: list[int]) -> list[Any]:
    """The model's cache for ``prompt`` minus its last token, computed for this prompt alone; the last token
    is the input of the first decoding step (as mlx-lm's generate_step splits a prompt)."""
    cache = make_prompt_cache(model)
    head = prompt[:-1]
    for start in range(0, len(head), PREFILL_CHUNK):
        model(mx.array(head[start : start + PREFILL_CHUNK])[None], cache=cache)
        mx.eval([layer.state for layer in cache])
    return cache


def _sample_batched(
    model: Any,
    prompts: list[list[int]],
    rows: list[RowSampling],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    stream: Callable[[int, int], None] | None,
) -> list[list[int]]:
    from mlx_lm.generate import BatchGenerator

    caches: dict[tuple[int, ...], list[Any]] = {}
    for prompt in prompts:  # merging only reads a cache: rows on one prompt share its prefill
        if tuple(prompt) not in caches:
            caches[tuple(prompt)] = prefill(model, prompt)
    # every row in the first decoding batch: mlx-lm would otherwise admit 8 at a time (continuous batching)
    generator = BatchGenerator(
        model,
        max_tokens=max_new_tokens,
        stop_tokens=[[token] for token in stop_ids] or None,
        completion_batch_size=len(prompts),
        prefill_batch_size=len(prompts),
    )
    outputs: list[list[int]] = [[] for _ in prompts]
    stops = set(stop_ids)
    try:
        uids = generator.insert(
            [[prompt[-1]] for prompt in prompts],
            caches=[caches[tuple(prompt)] for prompt in prompts],
            # what each cache holds (the repetition penalty's context); mlx-lm appends to these lists in place
            all_tokens=[list(prompt[:-1]) for prompt in prompts],
            samplers=[row_sampler(row) for row in rows],
            logits_processors=[row_processors(row) for row in rows],
        )
        row_of = {uid: index for index, uid in enumerate(uids)}
        while responses := generator.next_generated():
            for response in responses:
                if response.token in stops:  # the row has finished; its stop token is not part of the answer
                    continue
                row = row_of[response.uid]
                outputs[row].append(response.token)
                if stream is not None:
                    stream(row, response.token)
    finally:
        generator.close()
    return outputs


def sample_one_by_one(
    model: Any,
    prompts: list[list[int]],
    rows: list[RowSampling],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    stream: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """One row at a time with mlx-lm's generate_step and the same per-row samplers: ``batched=False`` (the
    baseline ``bench.generation --backend mlx`` compares with), or a model mlx-lm cannot batch."""
    from mlx_lm.generate import generate_step

    stops = set(stop_ids)
    outputs: list[list[int]] = []
    for index, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        tokens: list[int] = []
        steps = generate_step(
            mx.array(prompt),
            model,
            max_tokens=max_new_tokens,
            sampler=row_sampler(row),
            logits_processors=row_processors(row) or None,
        )
        for token, _ in steps:
            if int(token) in stops:
                break
            tokens.append(int(token))
            if stream is not None:
                stream(index, int(token))
        outputs.append(tokens)
    return outputs
