"""Batching: the [chosen..., rejected...] layout, masks, and seeded length grouping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.batching import collate, padding_fraction, plan_batches
from core.data import load_preferences
from core.tokenization import ChatTokenizer, TokenizedPair, tokenize_pairs


def pair(index: int, prompt: int, chosen: int, rejected: int) -> TokenizedPair:
    ids = lambda n, base: np.arange(base, base + n, dtype=np.int32)  # noqa: E731
    return TokenizedPair(
        index, ids(prompt, 1000 * index + 100), ids(chosen, 1000 * index + 200), ids(rejected, 1000 * index + 300)
    )


def test_layout_is_chosen_then_rejected_with_reply_only_masks() -> None:
    pairs = [pair(0, 3, 2, 4), pair(1, 5, 1, 2)]
    batch = collate(pairs, pad_id=-1)
    assert batch.input_ids.shape == (4, 7) and batch.input_ids.dtype == np.int32
    # rows: chosen_0, chosen_1, rejected_0, rejected_1
    assert batch.input_ids[0].tolist() == [100, 101, 102, 200, 201, -1, -1]
    assert batch.input_ids[1].tolist() == [1100, 1101, 1102, 1103, 1104, 1200, -1]
    assert batch.input_ids[2].tolist() == [100, 101, 102, 300, 301, 302, 303]
    assert batch.input_ids[3].tolist() == [1100, 1101, 1102, 1103, 1104, 1300, 1301]
    assert batch.loss_mask.tolist() == [
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 1, 1],
    ]
    assert batch.attention_mask.sum(1).tolist() == [5, 6, 7, 7]
    assert batch.response_lengths.tolist() == [2, 1, 4, 2] == batch.loss_mask.sum(1).tolist()
    assert batch.prompt_lengths.tolist() == [3, 5, 3, 5]
    assert batch.pair_indices.tolist() == [0, 1] and batch.num_pairs == 2
    assert batch.padding_fraction == pytest.approx(3 / 28)
    assert collate(pairs, pad_id=0, pad_to_multiple_of=8).input_ids.shape == (4, 8)


def test_plans_are_seeded_deterministic_and_cover_every_pair_once() -> None:
    lengths = np.random.default_rng(0).integers(10, 500, size=103)
    plan = plan_batches(lengths, 4, seed=7, epoch=2)
    again = plan_batches(lengths, 4, seed=7, epoch=2)
    assert [b.tolist() for b in plan] == [b.tolist() for b in again]
    assert [b.tolist() for b in plan] != [b.tolist() for b in plan_batches(lengths, 4, seed=8, epoch=2)]
    assert [b.tolist() for b in plan] != [b.tolist() for b in plan_batches(lengths, 4, seed=7, epoch=3)]
    assert sorted(np.concatenate(plan).tolist()) == list(range(103))
    assert len(plan) == 26 and len(plan_batches(lengths, 4, seed=7, drop_last=True)) == 25
    assert lengths[plan[0]].max() == lengths.max()  # the longest pair is met at the first step


def test_length_grouping_cuts_padding_on_real_data(fixture_data: Path, qwen_tokenizer) -> None:
    pairs, _ = load_preferences(fixture_data / "llamafactory_dpo_en_demo.json")
    tokenized, _ = tokenize_pairs(pairs, ChatTokenizer(qwen_tokenizer), max_length=1024)
    lengths = [p.length for p in tokenized]
    grouped = padding_fraction(tokenized, plan_batches(lengths, 4, seed=0))
    shuffled = padding_fraction(tokenized, plan_batches(lengths, 4, seed=0, group_by_length=False))
    assert grouped < 0.6 * shuffled, (grouped, shuffled)
    # the fraction reported equals the one measured on the collated arrays
    plan = plan_batches(lengths, 4, seed=0)
    batches = [collate([tokenized[i] for i in b], pad_id=0) for b in plan]
    padded = sum(b.input_ids.size for b in batches)
    assert grouped == pytest.approx(1 - sum(b.num_tokens for b in batches) / padded)


def test_without_shuffle_every_epoch_takes_the_pairs_in_order() -> None:
    lengths = list(range(10, 0, -1))
    plan = plan_batches(lengths, 4, seed=3, epoch=5, shuffle=False)
    assert [b.tolist() for b in plan] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.tolist() for b in plan_batches(lengths, 4, seed=3, shuffle=False, drop_last=True)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]


def test_the_reference_pass_batches_by_tokens_never_above_the_first_batch() -> None:
    from core.reference import token_batches
    from core.tokenization import TokenizedPair

    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 200, 97)
    pairs = [
        TokenizedPair(i, np.zeros(3, np.int32), np.zeros(n - 3, np.int32), np.zeros(1, np.int32))
        for i, n in enumerate(lengths)
    ]
    batches = token_batches(pairs, batch_size=4)
    assert sorted(i for b in batches for i in b) == list(range(97))
    order = [i for b in batches for i in b]
    assert [pairs[i].length for i in order] == sorted(lengths, reverse=True)  # longest first
    budget = 4 * int(lengths.max())
    assert len(batches[0]) == 4
    for batch in batches:
        assert len(batch) * max(pairs[i].length for i in batch) <= budget
    assert len(batches[-1]) > 4 * 2  # the short pairs go many to a batch
    assert token_batches([], 4) == []
