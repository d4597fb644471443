"""The masked log-prob kernel: summed log-probs of the response tokens only, without full-vocab logits.

The decoder runs to hidden states; only the positions that predict a response token are gathered; the
LM head and log-softmax run over those positions in chunks. A custom autograd function keeps only the
per-position log-sum-exp between forward and backward and recomputes one chunk's logits at a time in the
backward pass, so neither ``[batch, seq, vocab]`` logits nor a ``[tokens, vocab]`` gradient ever exist:
the head's working memory is a few ``[chunk, vocab]`` blocks (the logits, their float32 copy under bf16, the
log-sum-exp temporary). A frozen head (LoRA) gets no weight gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.batching import SharedPromptBatch


class ChunkedTokenLogProbs(torch.autograd.Function):
    """log softmax(h Wᵀ + b)[target] for each row of h, in chunks of rows, accumulated in float32 (or float64
    for float64 inputs)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        count = hidden.shape[0]
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        token_logps = torch.empty(count, dtype=accumulate, device=hidden.device)
        log_normalizers = torch.empty(count, dtype=accumulate, device=hidden.device)
        for start in range(0, count, chunk_size):
            end = min(start + chunk_size, count)
            logits = F.linear(hidden[start:end], weight, bias).to(accumulate)
            normalizer = torch.logsumexp(logits, dim=-1)
            token_logps[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - normalizer
            log_normalizers[start:end] = normalizer
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(hidden, weight, bias, targets, log_normalizers)
        return token_logps

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")  # the backward recomputes logits under the forward's autocast
    def backward(ctx: Any, grad_output: torch.Tensor):
        hidden, weight, bias, targets, log_normalizers = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        accumulate = log_normalizers.dtype
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if need_bias else None
        grad_output = grad_output.to(accumulate)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            chunk = hidden[start:end]
            # d logp[t] / d logits = onehot(t) - softmax(logits); scaled by the incoming gradient, in place
            grad_logits = F.linear(chunk, weight, bias).to(accumulate)
            grad_logits.sub_(log_normalizers[start:end, None]).exp_().mul_(-grad_output[start:end, None])
            grad_logits.scatter_add_(1, targets[start:end, None], grad_output[start:end, None])
            if grad_weight is not None:  # from the full-precision gradient, before it is rounded for the matmul
                # (custom_bwd runs this under the forward's autocast, which would do the product in bf16)
                with torch.autocast(device_type=chunk.device.type, enabled=False):
                    grad_weight.add_(grad_logits.t() @ chunk.to(accumulate))
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0))
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits.to(hidden.dtype) @ weight
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _checkpointed_token_logps(
    hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """The general path for heads the fused function cannot express (soft-capping, scaling, quantized
    heads): each chunk's logits are recomputed in the backward pass instead of kept."""

    def chunk_logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        return logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        pieces.append(checkpoint(chunk_logps, h, t, use_reentrant=False) if h.requires_grad else chunk_logps(h, t))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def logit_transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What some architectures apply to the LM head's output (None when nothing)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)  # Cohere
    divide = getattr(config, "logits_scaling", None)  # Granite
    if not (softcap or scale not in (None, 1.0) or divide not in (None, 1.0)):
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale not in (None, 1.0):
            logits = logits * scale
        if divide not in (None, 1.0):
            logits = logits / divide
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


def token_logps(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    targets: torch.Tensor,
    chunk_size: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` ([M, H] → [M], float32)."""
    plain = type(lm_head) is torch.nn.Linear and transform is None
    if plain:
        return ChunkedTokenLogProbs.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk_size)
    head = lm_head if transform is None else (lambda h: transform(lm_head(h)))
    return _checkpointed_token_logps(hidden, head, targets, chunk_size)


def response_positions(input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """(rows, positions, targets): position t of a row predicts token t + 1 when that token is a reply token."""
    rows, positions = loss_mask[:, 1:].bool().nonzero(as_tuple=True)
    return rows, positions, input_ids[rows, positions + 1]


def masked_sequence_logps(
    decoder: torch.nn.Module,
    lm_head: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Summed response log-probs per row ([N], float32) through the response-only chunked head."""
    rows, positions, targets = response_positions(input_ids, loss_mask)
    return gathered_sequence_logps(
        decoder,
        lm_head,
        input_ids,
        attention_mask,
        None,
        rows,
        positions,
        targets,
        rows,
        input_ids.shape[0],
        chunk_size,
        transform,
    )


def gathered_sequence_logps(
    decoder: torch.nn.Module,
    lm_head: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None,
    rows: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    outputs: torch.Tensor,
    count: int,
    chunk_size: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the decoder once, then log p(targets[i]) from the hidden state at (rows[i], positions[i]), summed
    into ``count`` sequences by ``outputs``. The shared-prompt packing and the plain layout both use it."""
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    logps = token_logps(hidden[rows, positions], lm_head, targets, chunk_size, transform)
    return torch.zeros(count, dtype=logps.dtype, device=logps.device).index_add(0, outputs, logps)


def shared_prompt_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean attention: causal, never onto padding, and the rejected reply never sees the
    chosen one (both follow the same prompt)."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    keys = segments[:, None, :] != SharedPromptBatch.PADDING
    crossing = (segments[:, :, None] == SharedPromptBatch.REJECTED) & (segments[:, None, :] == SharedPromptBatch.CHOSEN)
    return (causal & keys & ~crossing)[:, None]


def naive_sequence_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """The textbook computation, full ``[N, T, V]`` logits and their log-softmax: for tests and benchmarks."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32, or fp64 for float64 checks
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return (logps * loss_mask[:, 1:].to(logps.dtype)).sum(dim=1)
