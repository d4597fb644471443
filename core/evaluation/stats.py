"""The statistics behind ``duet eval``: how a tuned model compares with its base model, and what it costs.

- `win_rate`: the judged win rate of tuned over base answers (ties count half), with a Wilson score interval
  that respects several samples per prompt (a design effect, Kish 1965).
- `length_controlled_win_rate`: the win rate at equal answer length, from a logistic fit of the outcomes on
  the length difference (the idea of AlpacaEval's length-controlled win rate, Dubois et al., 2024).
- `kl_from_samples` / `exact_token_kl`: how far the tuned policy moved from its reference, KL(π‖π_ref), and
  its entropy, estimated from sampled answers (Schulman, "Approximating KL divergence", 2020).
- `degeneration`: the cheap signs of a broken model: unfinished, empty and looping answers, distinct-n
  (Li et al., 2016).

Everything is float64 NumPy; each result is a frozen dataclass whose ``as_dict`` is JSON-safe (nan → None).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields
from statistics import NormalDist
from typing import Any

import numpy as np

# Fewer judged pairs than this cannot support a two-parameter logistic fit worth reporting.
MIN_LC_COMPARISONS = 8
# Ridge on the logistic coefficients: a N(0, 1/λ) prior (sd ≈ 32 log-odds per standard deviation of length
# difference), nothing next to the Fisher information of real data, but it keeps separated data finite.
LC_RIDGE = 1e-3
_NEWTON_TOLERANCE = 1e-10
_NEWTON_MAX_ITERATIONS = 200
# Repeating one 4-gram this many times in an answer is a loop, not style.
LOOP_REPEATS = 3


def _json_value(value: Any) -> Any:
    """A plain int/float for JSON: NumPy scalars become Python ones, and nan/inf (no JSON) become None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _as_dict(result: Any) -> dict[str, Any]:
    return {f.name: _json_value(getattr(result, f.name)) for f in fields(result)}


def _z(confidence: float) -> float:
    """The two-sided normal quantile for a confidence level (1.95996… for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, not {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


# --- win rate ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WinRate:
    """Judged comparisons of tuned against base: counts, the mean score (ties half) and its interval."""

    wins: int
    ties: int
    losses: int
    rate: float
    low: float
    high: float

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def as_dict(self) -> dict[str, Any]:
        return {**_as_dict(self), "n": self.n}


def _wilson(p: float, n_eff: float, z: float) -> tuple[float, float]:
    """Wilson's score interval (Wilson, 1927) for a proportion p seen in n_eff (possibly fractional) trials.

    It inverts the score test, so unlike p ± z·se it stays inside [0, 1] and keeps its coverage near 0 and 1.
    """
    z2n = z * z / n_eff
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n_eff + z2n / (4.0 * n_eff))
    return max(0.0, centre - half), min(1.0, centre + half)


def _group_sizes_and_sums(scores: np.ndarray, groups: Sequence[Hashable] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per unit (a group, or each comparison when there are no groups): its number of comparisons and score sum."""
    if groups is None:
        return np.ones_like(scores), scores
    if len(groups) != len(scores):
        raise ValueError(f"{len(groups)} groups for {len(scores)} outcomes")
    index: dict[Hashable, int] = {}
    codes = np.fromiter((index.setdefault(g, len(index)) for g in groups), dtype=np.int64, count=len(groups))
    sizes = np.bincount(codes, minlength=len(index)).astype(np.float64)
    sums = np.bincount(codes, weights=scores, minlength=len(index))
    return sizes, sums


def effective_sample_size(scores: np.ndarray, groups: Sequence[Hashable] | None = None) -> float:
    """How many independent binary trials the mean score is worth: n_eff = p̂(1−p̂) / Var̂(p̂).

    Var̂(p̂) is the cluster-robust (linearisation) variance of a ratio mean (Cochran, Sampling Techniques,
    1977, ch. 6): with m units of sizes n_g and score sums t_g, Var̂ = m/(m−1) · Σ (t_g − n_g p̂)² / n².
    With every group of the same size this is exactly "average within each group, use the groups as units":
    Var̂ = s²/m with s² the ddof=1 variance of the unit means, so n_eff = m/d with Kish's design effect
    d = s²/(p̂(1−p̂)). ddof=1 because it is the unbiased unit variance, which matters with few prompts; with no
    groups and binary outcomes its n/(n−1) makes n_eff = n − 1, which the clip below returns to n, so the
    result is then exactly the textbook Wilson interval.

    n_eff is clipped to [n²/Σn_g², n²]. The lower end is the value for perfectly correlated samples within a
    group (d = 1: m for equal groups, n with no groups); a smaller one would mean negative information. The
    upper end keeps data with (almost) no variation (every answer a tie, every prompt the same mean) from
    claiming a zero-width interval; it binds only there. With p̂ ∈ {0, 1} nothing shows how correlated a group's
    samples are, so n_eff takes the conservative lower end. Ties (score 0.5) have less variance than a win or
    a loss, so with ties n_eff may exceed n: the interval is then rightly narrower than a binary one.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        return 0.0
    n = float(scores.size)
    sizes, sums = _group_sizes_and_sums(scores, groups)
    units = sizes.size
    lowest, highest = n * n / float(np.sum(sizes * sizes)), n * n
    p = float(np.sum(scores)) / n
    spread = p * (1.0 - p)
    if units < 2 or spread <= 0.0:
        return lowest
    variance = units / (units - 1.0) * float(np.sum((sums - sizes * p) ** 2)) / (n * n)
    if variance <= 0.0:
        return highest
    return min(highest, max(lowest, spread / variance))


def win_rate(outcomes: Sequence[float], groups: Sequence[Hashable] | None = None, confidence: float = 0.95) -> WinRate:
    """The win rate of the tuned model with a Wilson score interval on an effective sample size.

    ``outcomes`` are per-comparison scores: 1 the tuned answer won, 0.5 a tie, 0 it lost (any score in [0, 1]
    is accepted and counted as a win above 0.5, a loss below). The rate is the mean score, ties counting half.
    ``groups`` names the prompt of each comparison when a prompt was answered several times: such samples are
    correlated, and treating them as independent makes the interval too narrow. The interval is Wilson's with
    n replaced by `effective_sample_size` (the design-effect correction); with binary outcomes and no groups it
    is exactly the classic Wilson interval.

    With no outcomes the rate is nan and the interval (0, 1): nothing is known.
    """
    z = _z(confidence)
    scores = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    if np.any(~np.isfinite(scores)) or np.any((scores < 0.0) | (scores > 1.0)):
        raise ValueError("win_rate: every outcome must be a score in [0, 1] (1 win, 0.5 tie, 0 loss)")
    wins, ties = int(np.sum(scores > 0.5)), int(np.sum(scores == 0.5))
    losses = int(scores.size) - wins - ties
    if scores.size == 0:
        return WinRate(wins=0, ties=0, losses=0, rate=math.nan, low=0.0, high=1.0)
    rate = float(np.mean(scores))
    low, high = _wilson(rate, effective_sample_size(scores, groups), z)
    return WinRate(wins=wins, ties=ties, losses=losses, rate=rate, low=low, high=high)


# --- length-controlled win rate ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthControlled:
    """The win rate the judge would give at equal length, and how much length itself sways it.

    ``slope`` is the change in log-odds of a win per 100 ``unit`` of length difference (tuned − base).
    """

    rate: float
    low: float
    high: float
    slope: float
    unit: str
    slope_se: float = math.nan
    intercept: float = math.nan
    intercept_se: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        return _as_dict(self)


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))


def _penalised_loglik(beta: np.ndarray, x: np.ndarray, y: np.ndarray, ridge: float) -> float:
    """Σ y·log σ(η) + (1−y)·log(1−σ(η)) − ridge/2·|β|², in the overflow-free log-sigmoid form."""
    eta = x @ beta
    loglik = -np.sum(y * np.logaddexp(0.0, -eta) + (1.0 - y) * np.logaddexp(0.0, eta))
    return float(loglik - 0.5 * ridge * float(beta @ beta))


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = LC_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Ridge-penalised maximum likelihood of P(y=1) = σ(x·β) for outcomes y in [0, 1], by damped Newton (IRLS).

    A fractional y (a tie is 0.5) is fine: the Bernoulli log-likelihood is linear in y, so the fit is the
    quasi-likelihood one whose estimating equation is Xᵀ(y − σ(Xβ)) = 0 (McCullagh & Nelder, 1989, ch. 9).
    The penalty makes the objective strictly concave, so Newton with step halving converges to its unique
    maximum, and keeps β finite under separation. Returns β and the inverse of the penalised Fisher information
    Xᵀ diag(σ(1−σ)) X + ridge·I, the covariance used for the standard errors (its Bernoulli variance σ(1−σ)
    over-states a tie's, so with ties the errors are a little conservative).
    """
    beta = np.zeros(x.shape[1], dtype=np.float64)
    current = _penalised_loglik(beta, x, y, ridge)
    identity = np.eye(x.shape[1])
    for _ in range(_NEWTON_MAX_ITERATIONS):
        mu = 0.5 * (1.0 + np.tanh(0.5 * (x @ beta)))
        gradient = x.T @ (y - mu) - ridge * beta
        information = (x.T * (mu * (1.0 - mu))) @ x + ridge * identity
        step = np.linalg.solve(information, gradient)
        if float(np.max(np.abs(step))) < _NEWTON_TOLERANCE:
            return beta, np.linalg.inv(information)
        scale = 1.0
        while scale > 1e-12:
            candidate = beta + scale * step
            value = _penalised_loglik(candidate, x, y, ridge)
            if value >= current:
                break
            scale /= 2.0
        else:  # no ascent along a Newton direction: only rounding is left, so this is the maximum
            return beta, np.linalg.inv(information)
        gain = value - current
        beta, current = candidate, value
        # near a flat maximum (separated data, held only by the ridge) the steps can stay above the tolerance
        # while the objective no longer moves in float64: that is the maximum too
        if gain <= 1e-13 * (1.0 + abs(current)):
            mu = 0.5 * (1.0 + np.tanh(0.5 * (x @ beta)))
            return beta, np.linalg.inv((x.T * (mu * (1.0 - mu))) @ x + ridge * identity)
    raise ArithmeticError(f"the logistic fit did not converge in {_NEWTON_MAX_ITERATIONS} Newton steps")


def length_controlled_win_rate(
    outcomes: Sequence[float],
    length_differences: Sequence[float],
    confidence: float = 0.95,
    unit: str = "tokens",
) -> LengthControlled | None:
    """The win rate at equal length: fit P(tuned wins) = σ(a + b·Δ) with Δ = tuned length − base length.

    Judges (people and models alike) favour longer answers, and preference tuning makes answers longer, so a
    raw win rate mixes "better" with "longer". The intercept a is the log-odds of a win at Δ = 0, so σ(a) is
    the rate the judge would give at equal length (the idea behind AlpacaEval's length-controlled win rate,
    Dubois et al., 2024, reduced to its core). Fitted by `fit_logistic` with outcomes 1/0.5/0 (a tie is
    y = 0.5) and a tiny ridge (`LC_RIDGE`); Δ is divided by its standard deviation for conditioning (not
    centred: a must stay the value at Δ = 0). The interval is σ(a ± z·se(a)) with se from the inverse Fisher
    information, so it is a Wald interval on the log-odds scale, mapped into (0, 1).

    Returns None with fewer than `MIN_LC_COMPARISONS` comparisons or no variation in Δ: then a and b cannot
    be told apart and the caller should report the raw rate. Under separation (outcomes perfectly predicted by
    Δ, or all wins) the ridge keeps every number finite, but the estimate then rests on the prior and its
    interval is wide: read it together with the raw rate.
    """
    z = _z(confidence)
    y = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    delta = np.asarray(length_differences, dtype=np.float64).reshape(-1)
    if y.size != delta.size:
        raise ValueError(f"{y.size} outcomes for {delta.size} length differences")
    if np.any(~np.isfinite(y)) or np.any((y < 0.0) | (y > 1.0)) or np.any(~np.isfinite(delta)):
        raise ValueError("length_controlled_win_rate: outcomes must lie in [0, 1] and lengths be finite")
    if y.size < MIN_LC_COMPARISONS:
        return None
    scale = float(np.std(delta))
    if not scale > 0.0:
        return None
    design = np.column_stack([np.ones_like(delta), delta / scale])
    beta, covariance = fit_logistic(design, y)
    a, a_se = float(beta[0]), math.sqrt(float(covariance[0, 0]))
    per_hundred = 100.0 / scale
    return LengthControlled(
        rate=_sigmoid(a),
        low=_sigmoid(a - z * a_se),
        high=_sigmoid(a + z * a_se),
        slope=float(beta[1]) * per_hundred,
        unit=unit,
        slope_se=math.sqrt(float(covariance[1, 1])) * per_hundred,
        intercept=a,
        intercept_se=a_se,
    )


# --- KL and entropy ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KLEstimate:
    """KL(π‖π_ref) per answer (with its interval), per token, and the policy's entropy per token."""

    per_answer: float
    low: float
    high: float
    per_token: float
    entropy_per_token: float
    answers: int
    tokens: int

    def as_dict(self) -> dict[str, Any]:
        return _as_dict(self)


def kl_from_samples(
    policy_logps: Sequence[float],
    reference_logps: Sequence[float],
    token_counts: Sequence[int],
    confidence: float = 0.95,
) -> KLEstimate:
    """Monte-Carlo KL(π‖π_ref) and entropy of the tuned policy π from answers it sampled.

    Each answer y comes with log π(y|x) and log π_ref(y|x) summed over its tokens (the end-of-turn token
    included, since stopping is part of the answer's probability) and its token count, counting those same
    tokens. KL(π‖π_ref) = E_{y∼π}[log π(y|x) − log π_ref(y|x)], so the mean log-ratio is its unbiased estimate
    (the "k1" estimator, Schulman 2020), and −mean log π(y|x) that of the entropy H(π). Both identities are
    expectations under π itself: the answers must be drawn from π exactly as scored, at temperature 1 with no
    top-k/top-p truncation (and no repetition penalty). A sampler that reshapes the distribution draws from
    some q ≠ π, and the mean then estimates E_q[log π/π_ref], which is no KL and can even be negative.

    ``per_answer`` is the sequence-level KL with a normal interval mean ± z·sd/√n (the central limit theorem:
    the log-ratios are many, independent and of finite variance; nan for fewer than two answers).
    ``per_token`` = Σ log-ratio / Σ tokens and ``entropy_per_token`` = −Σ log π / Σ tokens are rates per
    token (ratio estimators, consistent for E[KL]/E[length]), comparable across answer lengths.
    """
    z = _z(confidence)
    policy = np.asarray(policy_logps, dtype=np.float64).reshape(-1)
    reference = np.asarray(reference_logps, dtype=np.float64).reshape(-1)
    counts = np.asarray(token_counts, dtype=np.int64).reshape(-1)
    if not policy.size == reference.size == counts.size:
        raise ValueError(f"{policy.size} policy, {reference.size} reference log-probs, {counts.size} counts")
    if np.any(counts < 0):
        raise ValueError("kl_from_samples: token counts cannot be negative")
    answers, tokens = int(policy.size), int(np.sum(counts))
    ratio = policy - reference
    mean = float(np.mean(ratio)) if answers else math.nan
    low = high = math.nan
    if answers >= 2:
        half = z * float(np.std(ratio, ddof=1)) / math.sqrt(answers)
        low, high = mean - half, mean + half
    per_token = float(np.sum(ratio)) / tokens if tokens else math.nan
    entropy = -float(np.sum(policy)) / tokens if tokens else math.nan
    return KLEstimate(
        per_answer=mean,
        low=low,
        high=high,
        per_token=per_token,
        entropy_per_token=entropy,
        answers=answers,
        tokens=tokens,
    )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def exact_token_kl(policy_logits: np.ndarray, reference_logits: np.ndarray) -> np.ndarray:
    """The exact KL(π(·|y<t) ‖ π_ref(·|y<t)) at each position, from both models' full-vocabulary logits [T, V].

    Teacher-forced on one answer, the sum over its positions is the Rao–Blackwellised form of the answer's
    log-ratio: its expectation under π is the same sequence KL (the chain rule of KL), with less variance,
    since each position's sampling noise is integrated out exactly. Stable log-softmax in float64; the tiny
    negative values rounding can leave are clipped to 0, as KL is never negative.
    """
    policy = np.asarray(policy_logits, dtype=np.float64)
    reference = np.asarray(reference_logits, dtype=np.float64)
    if policy.shape != reference.shape or policy.ndim != 2:
        raise ValueError(f"exact_token_kl wants two [T, V] arrays, not {policy.shape} and {reference.shape}")
    log_p, log_q = _log_softmax(policy), _log_softmax(reference)
    return np.maximum(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1), 0.0)


# --- degeneration -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Degeneration:
    """Shares of sampled answers that show a broken model, and the answers' lengths in tokens."""

    answers: int
    finished: float
    empty: float
    distinct_1: float
    distinct_2: float
    repeated_4gram: float
    mean_tokens: float
    median_tokens: float

    def as_dict(self) -> dict[str, Any]:
        return _as_dict(self)


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(token_ids: Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams over all n-grams, pooled over the answers (Li et al., 2016); nan when there are none.

    Pooled rather than averaged per answer, so it also falls when different answers say the same thing.
    """
    pooled = [gram for tokens in token_ids for gram in _ngrams(tokens, n)]
    return len(set(pooled)) / len(pooled) if pooled else math.nan


def _loops(tokens: Sequence[int]) -> bool:
    """Whether some 4-gram occurs `LOOP_REPEATS` or more times (overlapping occurrences count)."""
    counts = Counter(_ngrams(tokens, 4))
    return bool(counts) and max(counts.values()) >= LOOP_REPEATS


def degeneration(token_ids: Sequence[Sequence[int]], finished: Sequence[bool]) -> Degeneration:
    """Cheap checks that tuning did not break generation: unfinished, empty and looping answers, diversity.

    ``finished`` says for each answer whether it ended with end-of-turn before the token limit (the caller
    knows). ``distinct_1``/``distinct_2`` are pooled distinct-n (`distinct_n`); ``repeated_4gram`` is the share
    of answers in which some 4-gram occurs at least three times, the signature of a loop. With no answers every
    share and length is nan (``as_dict`` gives None): an empty evaluation has no rates, not zero ones.
    """
    if len(token_ids) != len(finished):
        raise ValueError(f"{len(token_ids)} answers but {len(finished)} finished flags")
    answers = len(token_ids)
    if answers == 0:
        nan = math.nan
        return Degeneration(0, nan, nan, nan, nan, nan, nan, nan)
    lengths = np.array([len(tokens) for tokens in token_ids], dtype=np.float64)
    return Degeneration(
        answers=answers,
        finished=float(np.mean(np.asarray(finished, dtype=bool))),
        empty=float(np.mean(lengths == 0)),
        distinct_1=distinct_n(token_ids, 1),
        distinct_2=distinct_n(token_ids, 2),
        repeated_4gram=float(np.mean([_loops(tokens) for tokens in token_ids])),
        mean_tokens=float(np.mean(lengths)),
        median_tokens=float(np.median(lengths)),
    )
