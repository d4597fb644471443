"""Each pair's prompt computed once on MLX: the prompt's keys and values are computed in one pass, then both
replies run on them.

mlx-lm's models rotate positions (RoPE) from one offset per call, so the torch backend's packing (one row
``prompt | chosen | rejected`` with positions restarting for the rejected reply) cannot be expressed. The
KV route is exact instead: prompts are left-padded to a common length P (padding hidden from every real
token by the mask; RoPE only sees relative distances, so the shift changes nothing), every layer's keys
and values are kept, and the ``[chosen..., rejected...]`` replies then run with those prompt keys in front
of their own, at offset P. Gradients flow into the prompt pass from both replies.

Only decoders whose model is exactly "embed, blocks, norm" with full attention qualify (`can_share`);
others, and gradient checkpointing (whose wrapper cannot take a cache object), use the unshared path.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from backends.mlx_backend.kernel import POSITION_BUCKET
from core.batching import Batch

SHAREABLE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
LENGTH_BUCKET = 32  # prompt and reply widths are padded to a multiple of this (few compiled shapes)


def can_share(model: nn.Module, gradient_checkpointing: bool) -> bool:
    args = getattr(model, "args", None)
    inner = getattr(model, "model", None)
    if gradient_checkpointing or inner is None or getattr(args, "model_type", None) not in SHAREABLE_MODEL_TYPES:
        return False
    if getattr(inner, "swa_idx", None) is not None or getattr(args, "final_logit_softcapping", None):
        return False  # sliding-window layers mask differently
    return all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm"))


class _Recorder:
    """A stand-in KV cache for the prompt pass: positions from 0, and the layer's keys and values kept."""

    offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values


class _Prefix:
    """A stand-in KV cache for the reply pass: each pair's prompt keys (twice: chosen rows, then rejected
    rows) in front of the replies' own, which start at position ``offset``."""

    def __init__(self, recorded: _Recorder, offset: int) -> None:
        self.keys = mx.concatenate([recorded.keys, recorded.keys], axis=0)
        self.values = mx.concatenate([recorded.values, recorded.values], axis=0)
        self.offset = offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)


@dataclass
class SharedInputs:
    """A batch laid out for the shared pass; every array host-built, so a compiled step sees few shapes."""

    prompt_ids: mx.array  # int32 [B, P], left-padded
    prompt_mask: mx.array  # bool [B, 1, P, P]: causal, padding hidden (a padding query sees itself only)
    reply_ids: mx.array  # int32 [2B, R], right-padded, [chosen..., rejected...]
    reply_mask: mx.array  # bool [2B, 1, R, P + R]: the pair's real prompt tokens, then causal over the reply
    gather: mx.array  # int32 [M]: which hidden state (prompt states first, then reply states) predicts a token
    targets: mx.array  # int32 [M]
    rows: mx.array  # int32 [M]: the sequence (in [chosen..., rejected...]) the token belongs to
    valid: mx.array  # float32 [M], 0 for bucket padding


def _ceil(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def padded_width(length: int) -> int:
    """The width a prompt or reply pass runs at for a longest ``length``."""
    return _ceil(length, LENGTH_BUCKET)


def shared_inputs(batch: Batch) -> SharedInputs:
    pairs = batch.num_pairs
    prompts = batch.prompt_lengths[:pairs].astype(int)
    replies = batch.response_lengths.astype(int)
    width_p, width_r = padded_width(int(prompts.max())), padded_width(int(replies.max()))
    prompt_ids = np.zeros((pairs, width_p), np.int32)
    prompt_real = np.zeros((pairs, width_p), bool)
    reply_ids = np.zeros((2 * pairs, width_r), np.int32)
    gather, targets, rows = [], [], []
    for pair in range(pairs):
        length = prompts[pair]
        prompt_ids[pair, width_p - length :] = batch.input_ids[pair, :length]
        prompt_real[pair, width_p - length :] = True
    for row in range(2 * pairs):
        pair, start, length = row % pairs, prompts[row % pairs], replies[row]
        reply = batch.input_ids[row, start : start + length]
        reply_ids[row, :length] = reply
        # token 0 is predicted by the prompt's last state, token t by the reply's state t - 1
        gather.append(
            np.concatenate([[pair * width_p + width_p - 1], pairs * width_p + row * width_r + np.arange(length - 1)])
        )
        targets.append(reply)
        rows.append(np.full(length, row))
    count = sum(len(g) for g in gather)
    padded = _ceil(count, POSITION_BUCKET)
    valid = np.zeros(padded, np.float32)
    valid[:count] = 1.0

    def pad(parts: list[np.ndarray]) -> mx.array:
        return mx.array(np.pad(np.concatenate(parts), (0, padded - count)).astype(np.int32))

    causal_p = np.tril(np.ones((width_p, width_p), bool))
    prompt_mask = (causal_p[None] & prompt_real[:, None, :]) | np.eye(width_p, dtype=bool)[None]
    causal_r = np.tril(np.ones((width_r, width_r), bool))
    seen_prompt = np.broadcast_to(np.tile(prompt_real, (2, 1))[:, None, :], (2 * pairs, width_r, width_p))
    reply_mask = np.concatenate([seen_prompt, np.broadcast_to(causal_r, (2 * pairs, width_r, width_r))], axis=2)
    return SharedInputs(
        mx.array(prompt_ids),
        mx.array(prompt_mask[:, None]),
        mx.array(reply_ids),
        mx.array(reply_mask[:, None]),
        pad(gather),
        pad(targets),
        pad(rows),
        mx.array(valid),
    )


def shared_hidden(model: nn.Module, inputs: SharedInputs) -> mx.array:
    """Final hidden states ``[B·P + 2B·R, H]``: the prompts' rows, then the replies'."""
    inner = model.model
    recorders = [_Recorder() for _ in inner.layers]
    h = inner.embed_tokens(inputs.prompt_ids)
    for layer, recorder in zip(inner.layers, recorders, strict=True):
        h = layer(h, inputs.prompt_mask, recorder)
    prompt_hidden = inner.norm(h)
    offset = inputs.prompt_ids.shape[1]
    g = inner.embed_tokens(inputs.reply_ids)
    for layer, recorder in zip(inner.layers, recorders, strict=True):
        g = layer(g, inputs.reply_mask, _Prefix(recorder, offset))
    reply_hidden = inner.norm(g)
    width = prompt_hidden.shape[-1]
    return mx.concatenate([prompt_hidden.reshape(-1, width), reply_hidden.reshape(-1, width)])


def shared_sequence_logps(model: nn.Module, inputs: SharedInputs, token_logps, sequences: int) -> mx.array:
    """Summed reply log-probs per sequence ([2B], float32), in the ``[chosen..., rejected...]`` layout."""
    hidden = shared_hidden(model, inputs)
    logps = token_logps(hidden[inputs.gather], inputs.targets) * inputs.valid
    return mx.zeros((sequences,), dtype=mx.float32).at[inputs.rows].add(logps)
