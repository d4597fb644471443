"""The masked log-prob kernel: summed log-probs of the response tokens only, without full-vocab logits.

The decoder runs to hidden states; only the positions that predict a response token are gathered; the
LM head and log-softmax run over those positions in chunks, and on a CPU over the vocabulary in blocks that
stay in cache. A custom autograd function keeps, between forward and backward, either each position's
gradient with respect to its hidden state (a frozen float32 head: formed in the forward pass) or its
log-sum-exp (otherwise: the backward pass recomputes one block's logits at a time). Neither
``[batch, seq, vocab]`` logits nor a ``[tokens, vocab]`` gradient ever exist: the head's working memory is
one ``[chunk, vocab block]`` block (and its float32 copy under bf16). A frozen head (LoRA) gets no weight
gradient.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.backend import chunk_positions
from core.batching import SharedPromptBatch


class ChunkedTokenLogProbs(torch.autograd.Function):
    """log softmax(h Wᵀ + b)[target] for each row of h, in chunks of rows, accumulated in float32 (or float64
    for float64 inputs).

    Each chunk's logits are made ``vocab_block`` columns at a time and folded into a running log-sum-exp (the
    online softmax), so on a CPU the block stays in cache instead of streaming ``[chunk, vocab]`` floats
    through memory several times.

    With a frozen head (LoRA) in float32 or float64, the forward pass also forms d log p(t) / d h =
    W[t] - E_p[W] from the same blocks (one more product per block), and the backward pass only scales it by
    the incoming gradient: two passes over the head per step instead of three, since the backward otherwise
    recomputes every chunk's logits. It costs [positions, hidden] floats, a small fraction of a step's
    activations. A trainable head needs the probabilities themselves in the backward pass, and under bf16
    autocast the weighted sum would need float32 copies of the head's blocks (or bf16 partial sums), so both
    keep the recomputing backward. (On a CPU that backward, too, sums one bf16 product per vocabulary block,
    in float32.)
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        vocab_block: int | None = None,
    ) -> torch.Tensor:
        count, width = hidden.shape
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        block = vocab_block or weight.shape[0]
        grads_in_forward = (
            ctx.needs_input_grad[0]
            and not any(ctx.needs_input_grad[1:3])
            and hidden.dtype == weight.dtype == accumulate
            and not torch.is_autocast_enabled(hidden.device.type)
        )
        token_logps = torch.empty(count, dtype=accumulate, device=hidden.device)
        log_normalizers = torch.empty(count, dtype=accumulate, device=hidden.device)
        token_grads = torch.empty(count, width, dtype=accumulate, device=hidden.device) if grads_in_forward else None
        for start in range(0, count, chunk_size):
            end = min(start + chunk_size, count)
            rows = HeadChunk(hidden[start:end], weight, bias, targets[start:end], block, accumulate)
            grads = token_grads[start:end] if token_grads is not None else None
            token_logps[start:end], log_normalizers[start:end] = _log_softmax(rows, grads)
        ctx.chunk_size, ctx.vocab_block, ctx.grads_in_forward = chunk_size, block, grads_in_forward
        if grads_in_forward:
            ctx.save_for_backward(token_grads)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, log_normalizers)
        return token_logps

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")  # the backward recomputes logits under the forward's autocast
    def backward(ctx: Any, grad_output: torch.Tensor):
        if ctx.grads_in_forward:
            (token_grads,) = ctx.saved_tensors
            return token_grads * grad_output[:, None].to(token_grads.dtype), None, None, None, None, None
        hidden, weight, bias, targets, log_normalizers = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        accumulate = log_normalizers.dtype
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if need_bias else None
        grad_output = grad_output.to(accumulate)
        vocab, block = weight.shape[0], ctx.vocab_block
        buffer = block_buffer(min(ctx.chunk_size, hidden.shape[0]), block, vocab, accumulate, hidden.device)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            chunk, chunk_targets, scale = hidden[start:end], targets[start:end], grad_output[start:end, None]
            chunk_grad = torch.zeros(end - start, hidden.shape[1], dtype=accumulate, device=hidden.device)
            for low in range(0, vocab, block):
                high = min(low + block, vocab)
                block_weight = weight[low:high]
                block_bias = bias[low:high] if bias is not None else None
                # d logp[t] / d logits = onehot(t) - softmax(logits); scaled by the incoming gradient, in place
                grad_logits = block_logits(chunk, block_weight, block_bias, buffer)
                grad_logits.sub_(log_normalizers[start:end, None]).exp_().mul_(-scale)
                inside, columns = _block_columns(chunk_targets, low, high)
                grad_logits.scatter_add_(1, columns[:, None], scale * inside[:, None])
                if grad_weight is not None:  # from the full-precision gradient, before it is rounded for the matmul
                    # (custom_bwd runs this under the forward's autocast, which would do the product in bf16)
                    with torch.autocast(device_type=chunk.device.type, enabled=False):
                        grad_weight[low:high].add_(grad_logits.t() @ chunk.to(accumulate))
                if grad_bias is not None:
                    grad_bias[low:high].add_(grad_logits.sum(0))
                if grad_hidden is not None:
                    chunk_grad.add_(grad_logits.to(hidden.dtype) @ block_weight)
            if grad_hidden is not None:
                grad_hidden[start:end] = chunk_grad
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _block_columns(targets: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside, columns): which targets fall in vocabulary columns [low, high), and each one's column there
    (clamped into the block for the others, whose value is then masked)."""
    inside = (targets >= low) & (targets < high)
    return inside, (targets - low).clamp_(0, high - low - 1)


def block_buffer(rows: int, block: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Room for one ``[rows, block]`` block of logits, reused by every block of a chunk: a fresh tensor per
    block (2 MiB on a CPU) would be a fresh mapping under the host allocator's mmap threshold
    (host_memory.py), paid for in page faults at every block."""
    return torch.empty(rows * min(block, vocab), dtype=dtype, device=device)


def block_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffer: torch.Tensor
) -> torch.Tensor:
    """``hidden @ weightᵀ + bias`` in the buffer's precision, written into the buffer (a view of it is
    returned). Same-precision inputs go straight into it; a bf16 product (autocast) is made, then copied."""
    logits = buffer[: hidden.shape[0] * weight.shape[0]].view(hidden.shape[0], weight.shape[0])
    if hidden.dtype == weight.dtype == buffer.dtype and not torch.is_autocast_enabled(hidden.device.type):
        if bias is None:
            return torch.mm(hidden, weight.t(), out=logits)
        return torch.addmm(bias, hidden, weight.t(), out=logits)
    return logits.copy_(F.linear(hidden, weight, bias))


class HeadChunk(NamedTuple):
    """One chunk of rows for the head: their hidden states and targets, the head, the vocabulary block."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    block: int
    accumulate: torch.dtype  # float32, or float64 for float64 inputs


def _log_softmax(chunk: HeadChunk, token_grads: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), log-sum-exp) for one chunk of rows, the vocabulary a block at a time with a running
    maximum; fills ``token_grads`` with d log p(target) / d h = W[t] - E_p[W] when given. With or without
    it, the log-probs come from the same operations, so a policy whose adapter is still zero reproduces the
    reference pass's log-probs exactly (the first DPO loss is log 2).

    The gradient is formed as Σ_{v≠t} e_v (W[t] - W_v) / Σ_v e_v (e_v = exp(logit_v - max)), the target's own
    column left out of the weighted sum: for a confident token (p_t near 1) both parts are small and kept to
    full precision, where W[t] - E_p[W] taken literally would cancel to rounding noise."""
    hidden, weight, bias, targets, block, accumulate = chunk
    rows, vocab = hidden.shape[0], weight.shape[0]
    running_max = torch.full((rows,), float("-inf"), dtype=accumulate, device=hidden.device)
    others = torch.zeros(rows, dtype=accumulate, device=hidden.device)  # Σ_{v≠t} e_v
    target_logits = torch.zeros(rows, dtype=accumulate, device=hidden.device)
    if token_grads is not None:
        token_grads.zero_()  # Σ_{v≠t} e_v W_v until the end
    buffer = block_buffer(rows, block, vocab, accumulate, hidden.device)
    for low in range(0, vocab, block):
        high = min(low + block, vocab)
        block_weight = weight[low:high]
        logits = block_logits(hidden, block_weight, bias[low:high] if bias is not None else None, buffer)
        inside, columns = _block_columns(targets, low, high)
        at_column = logits.gather(1, columns[:, None])
        target_logits = torch.where(inside, at_column.squeeze(1), target_logits)
        new_max = torch.maximum(running_max, logits.amax(1))
        rescale = (running_max - new_max).exp_()  # exp(-inf) = 0 before the first block
        weights = logits.sub_(new_max[:, None]).exp_()  # in place: the block's logits are not needed again
        # the target's own column is left out (restored for the rows whose target lies elsewhere)
        weights.scatter_(1, columns[:, None], torch.where(inside[:, None], 0.0, (at_column - new_max[:, None]).exp_()))
        others.mul_(rescale).add_(weights.sum(1))
        if token_grads is not None:
            token_grads.mul_(rescale[:, None]).addmm_(weights, block_weight)
        running_max = new_max
    target_weight = (target_logits - running_max).exp_()
    log_normalizer = (others + target_weight).log_().add_(running_max)
    if token_grads is not None:
        token_grads.neg_().addcmul_(weight[targets], others[:, None]).div_((others + target_weight)[:, None])
    return target_logits - log_normalizer, log_normalizer


CPU_CHUNK_POSITIONS = 512  # reply positions per chunk on a CPU ("auto")
CPU_BLOCK_FLOATS = 1 << 19  # one [positions, vocab block] block of float32 logits: 2 MiB, a core's L2 cache


def head_blocking(setting: int | str, vocab_size: int, device_type: str) -> tuple[int, int | None]:
    """(reply positions per chunk, vocabulary columns per block) for the head on this device. A GPU takes
    each chunk's whole vocabulary at once, its size bounded by memory (`chunk_positions`); a CPU runs the
    products block by block, so that each block of logits is still in cache when the softmax reads it."""
    if device_type != "cpu":
        return chunk_positions(setting, vocab_size), None
    chunk = CPU_CHUNK_POSITIONS if setting == "auto" else int(setting)
    return chunk, min(vocab_size, max(256, CPU_BLOCK_FLOATS // chunk))


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
    vocab_block: int | None = None,
) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` ([M, H] → [M], float32)."""
    plain = type(lm_head) is torch.nn.Linear and transform is None
    if plain:
        return ChunkedTokenLogProbs.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk_size, vocab_block)
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
    vocab_block: int | None = None,
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
        vocab_block,
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
    vocab_block: int | None = None,
    row_lengths: list[int] | None = None,
    row_parts: list[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """Run the decoder, then log p(targets[i]) from the hidden state at (rows[i], positions[i]), summed into
    ``count`` sequences by ``outputs``. The shared-prompt packing and the plain layout both use it. With
    ``row_lengths`` (each right-padded row's real length) the decoder runs row by row at those lengths, so
    no padding is computed (see ``unpadded_hidden``); without, once over the padded batch. ``row_parts``
    (with ``row_lengths``, shared-prompt rows only): each row's (prompt, chosen, rejected) lengths, for the
    attention of shared_attention.py instead of the mask."""
    if row_lengths is None:
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        selected = hidden[rows, positions]
    else:
        selected = unpadded_hidden(
            decoder, input_ids, attention_mask, position_ids, rows, positions, row_lengths, row_parts
        )
    logps = token_logps(selected, lm_head, targets, chunk_size, transform, vocab_block)
    return torch.zeros(count, dtype=logps.dtype, device=logps.device).index_add(0, outputs, logps)


def unpadded_hidden(
    decoder: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    rows: torch.Tensor,
    positions: torch.Tensor,
    row_lengths: list[int],
    row_parts: list[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """The hidden states at (rows[i], positions[i]), each row run through the decoder on its own at its real
    length: a batch of unequal rows computes no padding (on a CPU a row of a few hundred tokens already
    fills the matrix units, so rows need no batching), and a row's result does not depend on what it was
    batched with (the reference pass and the steps batch pairs differently). With ``row_parts`` a
    shared-prompt row's attention runs in its two causal parts, without the mask."""
    states = []
    for row, length in enumerate(row_lengths):
        mask = None if attention_mask is None else attention_mask[row : row + 1, :, :length, :length]
        ids = None if position_ids is None else position_ids[row : row + 1, :length]
        if row_parts is None:
            extra: dict[str, Any] = {"attention_mask": mask}
        else:  # shared_attention.py: the row's two causal parts, no mask
            extra = {"attention_mask": None, "shared_prompt": row_parts[row]}
        out = decoder(input_ids=input_ids[row : row + 1, :length], position_ids=ids, use_cache=False, **extra)
        states.append(out.last_hidden_state[0])
    starts = torch.tensor([0, *itertools.accumulate(row_lengths[:-1])], device=rows.device)
    return torch.cat(states)[starts[rows] + positions]


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
