"""The masked log-prob kernel for MLX: response positions only, LM head and log-softmax in chunks.

The positions that predict reply tokens are found on the host (NumPy) and padded to a bucketed count, so
compiled graphs see few distinct shapes. ``mx.custom_function`` gives the chunked head a hand-written
backward pass that recomputes one chunk's logits at a time: no ``[tokens, vocab]`` logits or gradient is
kept between the forward and backward passes, and the frozen head gets no weight gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

POSITION_BUCKET = 128  # response positions are padded to a multiple of this


@dataclass
class Positions:
    """Host-computed gather indices: row and position of each predicted reply token, its target, validity."""

    rows: mx.array  # int32 [M]
    columns: mx.array  # int32 [M]
    targets: mx.array  # int32 [M]
    valid: mx.array  # float32 [M], 0 for bucket padding


def response_positions(input_ids: np.ndarray, loss_mask: np.ndarray, bucket: int = POSITION_BUCKET) -> Positions:
    rows, columns = np.nonzero(loss_mask[:, 1:])
    targets = input_ids[rows, columns + 1]
    count = len(rows)
    padded = max(bucket, -(-count // bucket) * bucket)
    valid = np.zeros(padded, np.float32)
    valid[:count] = 1.0
    pad = padded - count
    return Positions(
        mx.array(np.pad(rows, (0, pad)).astype(np.int32)),
        mx.array(np.pad(columns, (0, pad)).astype(np.int32)),
        mx.array(np.pad(targets, (0, pad)).astype(np.int32)),
        mx.array(valid),
    )


def output_head(model: nn.Module) -> Callable[[mx.array], mx.array]:
    """hidden → logits as the model computes them (an untied head, or the tied embedding; soft-capping)."""
    head = model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear
    args = getattr(model, "args", None)
    softcap = getattr(args, "final_logit_softcapping", None)
    if softcap:
        return lambda h: mx.tanh(head(h) / softcap) * softcap
    return head


def vocabulary_size(model: nn.Module) -> int:
    """Rows of the output head (its weight's first axis, quantized or not)."""
    layer = model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens
    return int(layer.weight.shape[0])


def decoder_hidden(model: nn.Module, input_ids: mx.array) -> mx.array:
    """Final hidden states (after the last norm), without the LM head."""
    return model.model(input_ids)


def _after(piece: mx.array, done: list[mx.array]) -> mx.array:
    """``piece``, scheduled after the previous chunk's result: without the edge, a compiled graph may hold
    every chunk's ``[chunk, vocab]`` logits at once, which is the memory the chunking exists to save."""
    return mx.depends(piece, done[-1]) if done else piece


def chunked_token_logps(head: Callable[[mx.array], mx.array], chunk_size: int) -> Callable:
    """A function (hidden [M, H], targets [M]) → log p(target) [M], float32, with a chunked custom backward."""

    def chunks(count: int):
        return [(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]

    @mx.custom_function
    def token_logps(hidden: mx.array, targets: mx.array) -> mx.array:
        pieces: list[mx.array] = []
        for start, end in chunks(hidden.shape[0]):
            logits = head(_after(hidden[start:end], pieces)).astype(mx.float32)
            picked = mx.take_along_axis(logits, targets[start:end, None], axis=-1).squeeze(-1)
            pieces.append(picked - mx.logsumexp(logits, axis=-1))
        return mx.concatenate(pieces)

    @token_logps.vjp
    def token_logps_vjp(primals, cotangent, output):
        hidden, targets = primals
        grads: list[mx.array] = []
        for start, end in chunks(hidden.shape[0]):
            piece = _after(hidden[start:end], grads)
            probs = mx.softmax(head(piece).astype(mx.float32), axis=-1)
            # d logp[t] / d logits = onehot(t) - softmax(logits). The one-hot comes from a comparison, not a
            # scatter into a copy, so a compiled step fuses it with the subtraction: one [chunk, vocab] buffer.
            # (Subtracting before the product with the head keeps 1 - p[t] exact when the model is confident.)
            onehot = mx.arange(probs.shape[-1], dtype=targets.dtype) == targets[start:end, None]
            grad_logits = (onehot.astype(mx.float32) - probs) * cotangent[start:end, None]
            _, (grad_piece,) = mx.vjp(head, [piece], [grad_logits.astype(piece.dtype)])
            grads.append(grad_piece)
        return mx.concatenate(grads), mx.zeros_like(targets)

    return token_logps


def sequence_logps(model: nn.Module, input_ids: mx.array, positions: Positions, token_logps: Callable) -> mx.array:
    """Summed reply log-probs per row ([N], float32)."""
    hidden = decoder_hidden(model, input_ids)
    logps = token_logps(hidden[positions.rows, positions.columns], positions.targets) * positions.valid
    return mx.zeros((input_ids.shape[0],), dtype=mx.float32).at[positions.rows].add(logps)


def naive_sequence_logps(model: nn.Module, input_ids: mx.array, loss_mask: mx.array) -> mx.array:
    """Full ``[N, T, V]`` logits and their log-softmax: for tests only."""
    logits = model(input_ids).astype(mx.float32)
    logps = logits[:, :-1] - mx.logsumexp(logits[:, :-1], axis=-1, keepdims=True)
    token = mx.take_along_axis(logps, input_ids[:, 1:, None], axis=-1).squeeze(-1)
    return (token * loss_mask[:, 1:].astype(mx.float32)).sum(axis=1)
