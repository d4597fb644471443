"""Batched sampling with a KV cache, each row with its own seed and settings.

transformers' ``generate`` draws every row's tokens from one random stream, so a row's text depends on what
else is in the batch; and it runs a general pipeline of processors per step. Here each row has its own
``torch.Generator``: an answer is a function of its prompt, seed and settings alone, whatever it is batched
with, so a person's next prompts and both answers of a pair can be sampled in one batch and still be
reproduced one by one. The step is the model's forward on one new token per row against the cache (only
the last position's logits are computed) into a preallocated cache, then per-row temperature, top-k and
top-p. Greedy rows take the
argmax: the same tokens as ``generate(do_sample=False)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from core.sampling import RowSampling


def _filtered_probs(logits: torch.Tensor, row: RowSampling) -> torch.Tensor:
    """One row's next-token distribution after temperature, top-k and top-p (float32)."""
    scores = logits / row.temperature
    if 0 < row.top_k < scores.numel():
        kth = torch.topk(scores, row.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if row.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # the mass of the tokens ranked above
        drop = before >= row.top_p  # keep the smallest head whose mass reaches top_p (never empty)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return probs


def cache_argument(model: torch.nn.Module) -> str:
    """The name the model's forward takes its KV cache by: ``cache`` in recent transformers, ``past_key_values``
    before (5.17 and older). A wrong name is not an error there: it lands in ``**kwargs``, the cache is never
    filled, and every decoding step would see only its one new token."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes it through
    parameters = inspect.signature(base.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@torch.inference_mode()
def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    rows: list[RowSampling],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    device: torch.device,
    stream: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """The tokens generated after each prompt (left-padded into one batch), each row stopping at its first
    stop id (not included) or after ``max_new_tokens``."""
    from transformers import StaticCache

    count, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    mask = torch.zeros((count, width), dtype=torch.long)
    for index, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
        input_ids[index, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[index, width - len(prompt) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator(device="cpu").manual_seed(row.seed) for row in rows]
    stops = set(stop_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * count
    # preallocated for the longest the batch can get: a growing cache copies every key and value at each
    # step (a batch of 16 long prompts spent more time in those copies and their page faults than in the model)
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    cache_name = cache_argument(model)
    logits = _prefill_distinct(model, prompts, cache, width, device, cache_name)
    if logits is None:  # a cache layout this code does not know: the whole left-padded batch at once
        logits = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_name: cache},
        ).logits[:, -1, :]
    penalties = torch.tensor([row.repetition_penalty for row in rows], dtype=torch.float32, device=device)[:, None]
    penalize = bool((penalties != 1.0).any())
    if penalize:  # the tokens each row has seen: its prompt, then what it generates
        seen = torch.zeros((count, logits.shape[-1]), dtype=torch.bool, device=device)
        for index, prompt in enumerate(prompts):
            seen[index, torch.tensor(prompt, dtype=torch.long, device=device)] = True
    for _ in range(max_new_tokens):
        scores = logits.float()
        if penalize:  # as transformers does: a seen token's logit is divided by the penalty (multiplied if < 0)
            penalized = torch.where(scores < 0, scores * penalties, scores / penalties)
            scores = torch.where(seen, penalized, scores)
        chosen = _choose(scores, rows, generators, done)
        if penalize:
            seen[torch.arange(count, device=device), torch.tensor(chosen, device=device)] = True
        for index, token in enumerate(chosen):
            if done[index]:
                continue
            if token in stops:
                done[index] = True
                continue
            outputs[index].append(token)
            if stream is not None:
                stream(index, token)
        if all(done) or all(len(o) >= max_new_tokens for o, d in zip(outputs, done, strict=True) if not d):
            break
        step = torch.tensor([[pad_id if done[i] else chosen[i]] for i in range(count)], dtype=torch.long, device=device)
        mask = torch.cat([mask, torch.ones((count, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(
            input_ids=step,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_name: cache},
        ).logits[:, -1, :]
    return outputs


def _prefill_distinct(
    model: torch.nn.Module,
    prompts: list[list[int]],
    cache: Any,
    width: int,
    device: torch.device,
    cache_name: str = "cache",
) -> torch.Tensor | None:
    """Each distinct prompt run once, alone and unpadded, its keys and values copied into every row of the
    batch's static cache that asks it (right-aligned, as left padding puts them); the last position's logits
    of each row. Padding a batch to its longest prompt and running both answers of a pair on the same prompt
    cost the prefill 2-4× the work it needs. None when the cache is not the layout this code fills (the
    caller then prefills the padded batch)."""
    from transformers import DynamicCache
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    # Only plain full-attention layers hold a prompt's keys at the positions copied below: a sliding-window
    # layer (Gemma-, Mistral-style) keeps a ring of its last window, and the unpadded run's cache would
    # already be cut to that window.
    if not layers or not all(type(layer) is StaticLayer and layer.max_cache_len >= width for layer in layers):
        return None
    rows_of: dict[tuple[int, ...], list[int]] = {}
    for index, prompt in enumerate(prompts):
        rows_of.setdefault(tuple(prompt), []).append(index)
    count = len(prompts)
    logits: torch.Tensor | None = None
    for prompt, rows in rows_of.items():
        length = len(prompt)
        alone = DynamicCache(config=model.config)
        out = model(
            input_ids=torch.tensor([prompt], dtype=torch.long, device=device),
            position_ids=torch.arange(length, device=device)[None],
            use_cache=True,
            logits_to_keep=1,
            **{cache_name: alone},
        )
        if logits is None:
            logits = out.logits.new_empty((count, out.logits.shape[-1]))
        logits[rows] = out.logits[0, -1]
        for layer, single in zip(layers, alone.layers, strict=True):
            keys, values = single.keys, single.values  # [1, heads, length, dim]
            if not layer.is_initialized:  # sized like the batch's: [count, heads, max_cache_len, dim]
                layer.lazy_initialization(keys.expand(count, -1, -1, -1), values.expand(count, -1, -1, -1))
            layer.keys[rows, :, width - length : width] = keys[0]
            layer.values[rows, :, width - length : width] = values[0]
    for layer in layers:  # what the padded prefill would have left: every row's history is `width` long
        layer.cumulative_length.fill_(width)
    return logits


def _choose(
    logits: torch.Tensor, rows: list[RowSampling], generators: list[torch.Generator], done: list[bool]
) -> list[int]:
    chosen = logits.argmax(dim=-1).tolist()
    plain: dict[float, list[int]] = {}  # temperature → rows sampled from the whole distribution
    for index, row in enumerate(rows):
        if done[index] or row.temperature <= 0:
            continue
        if row.top_k == 0 and row.top_p >= 1.0:
            plain.setdefault(row.temperature, []).append(index)
        else:
            chosen[index] = _draw(_filtered_probs(logits[index], row), generators[index])
    for temperature, indices in plain.items():  # the common case, one softmax and one cumsum for all its rows
        probs = torch.softmax(logits[indices] / temperature, dim=-1)
        for index, token in zip(indices, _draw_rows(probs, [generators[i] for i in indices]), strict=True):
            chosen[index] = token
    return [int(token) for token in chosen]


def _draw_rows(probs: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
    """``_draw`` for each row of ``probs`` [rows, vocab], each with its own generator: the same tokens."""
    cumulative = probs.double().cumsum(-1)
    uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    points = uniforms.to(cumulative.device) * cumulative[:, -1]
    indices = torch.searchsorted(cumulative, points[:, None], right=True)[:, 0]
    return indices.clamp(max=probs.shape[-1] - 1).tolist()


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from ``probs`` by inversion: the first token whose cumulative probability exceeds a uniform
    draw. One random number per token drawn (multinomial draws one per vocabulary entry: over 49k entries that
    was a tenth of a decoding step); a token of probability 0 is never chosen."""
    cumulative = probs.double().cumsum(0)
    point = torch.rand((), generator=generator, dtype=torch.float64) * cumulative[-1].cpu()
    index = int(torch.searchsorted(cumulative, point.to(cumulative.device), right=True))
    return min(index, probs.numel() - 1)
