"""Length-aware, seeded batching of tokenized pairs into plain NumPy arrays any backend can take.

A batch of B pairs holds 2B rows laid out ``[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]``,
each row ``prompt + reply`` right-padded to the batch's longest row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.tokenization import TokenizedPair

MEGABATCH_FACTOR = 32  # pairs are sorted by length within windows of this many batches


@dataclass(eq=False)
class Batch:
    input_ids: np.ndarray  # int32 [2B, T]
    attention_mask: np.ndarray  # int32 [2B, T], 1 on real tokens
    loss_mask: np.ndarray  # int32 [2B, T], 1 on reply tokens only (the tokens whose log-prob counts)
    response_lengths: np.ndarray  # int32 [2B], = loss_mask.sum(1)
    prompt_lengths: np.ndarray  # int32 [2B]
    pair_indices: np.ndarray  # int64 [B], each pair's index in the loaded data
    labels: np.ndarray | None = None  # bool [B], unpaired examples' ratings (KTO); None for pairs

    @property
    def num_pairs(self) -> int:
        return len(self.pair_indices)

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens in the batch."""
        return int(self.attention_mask.sum())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.num_tokens / self.input_ids.size

    @property
    def shared_prompt_tokens(self) -> int:
        """Real tokens with each pair's prompt counted once (``prompt | chosen | rejected`` rows, unpadded)."""
        pairs = self.num_pairs
        return int((self.prompt_lengths[:pairs] + self.response_lengths[:pairs] + self.response_lengths[pairs:]).sum())

    def pair(self, index: int) -> Batch:
        """The batch of this one pair (its two rows), cut to their own width."""
        rows = [index, self.num_pairs + index]
        width = int(self.attention_mask[rows].sum(axis=1).max())
        return Batch(
            self.input_ids[rows, :width],
            self.attention_mask[rows, :width],
            self.loss_mask[rows, :width],
            self.response_lengths[rows],
            self.prompt_lengths[rows],
            self.pair_indices[index : index + 1],
            None if self.labels is None else self.labels[index : index + 1],
        )


def collate(pairs: Sequence[TokenizedPair], pad_id: int, pad_to_multiple_of: int = 1) -> Batch:
    """Stack pairs into one batch; the width is rounded up to ``pad_to_multiple_of`` (fewer shapes to compile)."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(reply) for prompt, reply in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    count = len(rows)
    input_ids = np.full((count, width), pad_id, dtype=np.int32)
    attention_mask = np.zeros((count, width), dtype=np.int32)
    loss_mask = np.zeros((count, width), dtype=np.int32)
    prompt_lengths = np.zeros(count, dtype=np.int32)
    response_lengths = np.zeros(count, dtype=np.int32)
    for row, (prompt, reply) in enumerate(rows):
        end = len(prompt) + len(reply)
        input_ids[row, : len(prompt)] = prompt
        input_ids[row, len(prompt) : end] = reply
        attention_mask[row, :end] = 1
        loss_mask[row, len(prompt) : end] = 1
        prompt_lengths[row] = len(prompt)
        response_lengths[row] = len(reply)
    return Batch(
        input_ids,
        attention_mask,
        loss_mask,
        response_lengths,
        prompt_lengths,
        np.array([p.index for p in pairs], dtype=np.int64),
        _labels(pairs),
    )


def _labels(pairs: Sequence[TokenizedPair]) -> np.ndarray | None:
    labels = [p.label for p in pairs]
    if all(label is None for label in labels):
        return None
    if any(label is None for label in labels):
        raise ValueError("a batch mixes preference pairs with unpaired examples")
    return np.array(labels, dtype=bool)


def plan_batches(
    lengths: Sequence[int] | np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    group_by_length: bool = True,
    drop_last: bool = False,
    shuffle: bool = True,
) -> list[np.ndarray]:
    """The order of one epoch: a list of index arrays into ``lengths``, a pure function of its arguments.

    With ``group_by_length``, pairs are shuffled, then sorted by length within windows of
    ``MEGABATCH_FACTOR`` batches, so a batch holds pairs of similar length (little padding) while the
    order stays random. The batch holding the longest pair comes first, so a run that would run out of
    memory does so at its first step rather than hours in. Without ``shuffle``, every epoch takes the pairs
    in their order, in consecutive batches (to compare step by step with another tool).
    """
    lengths = np.asarray(lengths)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not shuffle:
        batches = [np.arange(i, min(i + batch_size, len(lengths))) for i in range(0, len(lengths), batch_size)]
        return [batch for batch in batches if len(batch) == batch_size] if drop_last else batches
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        # windows of whole batches: a batch never straddles two sorted windows
        window = batch_size * MEGABATCH_FACTOR
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks]) if chunks else order
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length and len(batches) > 1:
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda i: lengths[batches[i]].max())
        batches.insert(0, batches.pop(longest))
    if drop_last:  # after the shuffle: the full batches keep the order they have without drop_last
        batches = [batch for batch in batches if len(batch) == batch_size]
    return batches


def padding_fraction(
    pairs: Sequence[TokenizedPair], batches: Sequence[np.ndarray], pad_to_multiple_of: int = 1
) -> float:
    """The share of padded positions over an epoch of ``batches`` (0 = no padding)."""
    real = padded = 0
    for indices in batches:
        rows = [len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) for i in indices]
        rows += [len(pairs[i].prompt_ids) + len(pairs[i].rejected_ids) for i in indices]
        width = -(-max(rows) // pad_to_multiple_of) * pad_to_multiple_of
        real += sum(rows)
        padded += width * len(rows)
    return 1.0 - real / padded if padded else 0.0


SHARING_PAYS = 0.8  # share prompts when that leaves at most this share of the tokens to run


def sharing_pays(shared_tokens: int, plain_tokens: int) -> bool:
    """The rule behind ``model.share_prompts: auto``, the same on every backend: share when it cuts the
    tokens a batch runs by a fifth or more (below that, the packing's own cost eats the gain)."""
    return shared_tokens <= SHARING_PAYS * plain_tokens


@dataclass(eq=False)
class SharedPromptBatch:
    """A batch with each pair's prompt computed once: one row ``prompt | chosen | rejected`` per pair.

    Position ids restart at the end of the prompt for the rejected reply, and the attention rule (built
    from ``segments`` by the backend) hides the chosen reply from the rejected one, so every reply token
    sees exactly what it sees in its own ``prompt + reply`` row. The gather arrays say which hidden state
    predicts which reply token: the first token of each reply is predicted from the prompt's last position.
    """

    input_ids: np.ndarray  # int32 [B, T]
    position_ids: np.ndarray  # int32 [B, T]
    segments: np.ndarray  # int8 [B, T]: 0 padding, 1 prompt, 2 chosen, 3 rejected
    rows: np.ndarray  # int64 [M]: the packed row of each predicted reply token
    positions: np.ndarray  # int64 [M]: the position whose hidden state predicts it
    targets: np.ndarray  # int64 [M]: the token
    outputs: np.ndarray  # int64 [M]: where its log-prob adds up, in the [chosen..., rejected...] layout

    PADDING, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3


def share_prompts(batch: Batch, pad_id: int, pad_to_multiple_of: int = 1) -> SharedPromptBatch:
    """Repack a ``[chosen..., rejected...]`` batch so each pair's prompt appears (and is computed) once."""
    pairs = batch.num_pairs
    prompts = batch.prompt_lengths[:pairs]
    chosen, rejected = batch.response_lengths[:pairs], batch.response_lengths[pairs:]
    width = int((prompts + chosen + rejected).max())
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((pairs, width), pad_id, dtype=np.int32)
    position_ids = np.zeros((pairs, width), dtype=np.int32)
    segments = np.zeros((pairs, width), dtype=np.int8)
    rows, positions, targets, outputs = [], [], [], []
    for row in range(pairs):
        p, c, r = int(prompts[row]), int(chosen[row]), int(rejected[row])
        prompt = batch.input_ids[row, :p]
        chosen_ids = batch.input_ids[row, p : p + c]
        rejected_ids = batch.input_ids[pairs + row, p : p + r]
        input_ids[row, : p + c + r] = np.concatenate([prompt, chosen_ids, rejected_ids])
        position_ids[row, : p + c + r] = np.concatenate([np.arange(p + c), np.arange(p, p + r)])
        segments[row, :p] = SharedPromptBatch.PROMPT
        segments[row, p : p + c] = SharedPromptBatch.CHOSEN
        segments[row, p + c : p + c + r] = SharedPromptBatch.REJECTED
        for start, length, ids, output in ((p, c, chosen_ids, row), (p + c, r, rejected_ids, pairs + row)):
            predictors = np.concatenate([[p - 1], np.arange(start, start + length - 1)])
            rows.append(np.full(length, row))
            positions.append(predictors)
            targets.append(ids)
            outputs.append(np.full(length, output))
    join = lambda parts: np.concatenate(parts).astype(np.int64)  # noqa: E731
    return SharedPromptBatch(
        input_ids, position_ids, segments, join(rows), join(positions), join(targets), join(outputs)
    )
