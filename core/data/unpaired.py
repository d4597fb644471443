"""Unpaired examples (one reply, rated desirable or not) laid out for KTO.

KTO's reference point z₀ is an estimate of KL(πθ ‖ πref), taken on *mismatched* prompt–reply pairs: a
prompt with the reply given to another prompt (Ethayarajh et al., 2024, §4.1). Each example is stored as a
``PreferencePair`` whose ``chosen`` is its rated reply and ``rejected`` that mismatched reply, fixed once
when the data is loaded. Fixing it there (rather than per batch, as TRL rotates the completions of each
batch by one) keeps an example's rows the same in every epoch, so the reference log-probs are cached and
the prompt is computed once for both rows, like any pair's. The batch's mismatched replies are then a random
draw from the data set's replies, rather than the batch's own: the same estimand, E_x' KL of the data's replies.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from core.data.records import PreferencePair

MAX_LOOK_BACK = 64  # examples searched for a different prompt (all one prompt: the previous reply serves)
BALANCE_RANGE = (1.0, 4.0 / 3.0)  # KTO paper, eq. 8: λ_D n_D / (λ_U n_U) should lie in [1, 4/3]


def split_pairs(pairs: list[PreferencePair]) -> list[PreferencePair]:
    """Each preference pair as two unpaired examples: its chosen reply desirable, its rejected one not."""
    examples = []
    for pair in pairs:
        examples.append(dataclasses.replace(pair, rejected="", label=True))
        examples.append(dataclasses.replace(pair, chosen=pair.rejected, rejected="", label=False))
    return examples


def with_mismatched_replies(examples: list[PreferencePair], seed: int) -> list[PreferencePair]:
    """Each example with the reply of another example as its ``rejected``: a seeded shuffle, then every
    example takes the reply of the one before it, or of the nearest one before that whose prompt differs
    (two examples from one pair share a prompt; a same-prompt reply would not be mismatched)."""
    if len(examples) < 2:
        return [dataclasses.replace(e, rejected=e.chosen) for e in examples]
    order = np.random.default_rng([seed, 0x4B70]).permutation(len(examples))
    count = len(order)
    result: list[PreferencePair | None] = [None] * count
    for position, index in enumerate(order):
        example = examples[index]
        partner = examples[order[position - 1]]
        for back in range(1, min(count, MAX_LOOK_BACK)):
            candidate = examples[order[position - back]]
            if (candidate.system, candidate.prompt) != (example.system, example.prompt):
                partner = candidate
                break
        result[index] = dataclasses.replace(example, rejected=partner.chosen)
    return [e for e in result if e is not None]


def balance_advice(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """The KTO paper's advice (eq. 8) on the class weights when the classes are imbalanced, or None."""
    if desirable == 0 or undesirable == 0:
        missing = "undesirable (thumbs-down)" if undesirable == 0 else "desirable (thumbs-up)"
        return (
            f"all {desirable + undesirable} examples are {'desirable' if undesirable == 0 else 'undesirable'}: "
            f"KTO then only moves them against the KL baseline. Add {missing} examples for a preference to learn."
        )
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    low, high = BALANCE_RANGE
    if low <= ratio <= high:
        return None
    advised_low = undesirable_weight * undesirable / desirable * low
    advised_high = undesirable_weight * undesirable / desirable * high
    advised_u_low = desirable_weight * desirable / undesirable / high
    advised_u_high = desirable_weight * desirable / undesirable / low
    return (
        f"{desirable} desirable and {undesirable} undesirable examples: λ_D·n_D / (λ_U·n_U) = {ratio:.2f}, outside "
        f"the KTO paper's advised [1, 1.33] (eq. 8). Set objective.desirable_weight in "
        f"[{advised_low:.2f}, {advised_high:.2f}] or objective.undesirable_weight in "
        f"[{advised_u_low:.2f}, {advised_u_high:.2f}] (one of them)."
    )
