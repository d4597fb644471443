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
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowSampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int = 0
    repetition_penalty: float = 1.0  # > 1 discourages every token already in the prompt or the answer


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
    logits = model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
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
            input_ids=step, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        ).logits[:, -1, :]
    return outputs


def _choose(
    logits: torch.Tensor, rows: list[RowSampling], generators: list[torch.Generator], done: list[bool]
) -> list[int]:
    greedy = logits.argmax(dim=-1).tolist()
    chosen = []
    for index, row in enumerate(rows):
        if done[index] or row.temperature <= 0:
            chosen.append(int(greedy[index]))
            continue
        probs = _filtered_probs(logits[index], row).cpu()
        chosen.append(int(torch.multinomial(probs, 1, generator=generators[index]).item()))
    return chosen
