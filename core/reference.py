"""Reference log-probs: computed once before training, cached on disk, shared by every backend.

They are just two numbers per pair (summed log-probs of the chosen and rejected replies under the
reference model), keyed by a fingerprint of everything they depend on: the base model's weights, the
starting adapter if any, the compute dtype, and every token id of every pair (which covers the data,
tokenizer, chat template and truncation).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core import faults
from core.atomic import remove_stale_temporaries, write_safetensors
from core.batching import collate
from core.distributed import SINGLE, Collective
from core.fingerprint import combine, tokens_fingerprint
from core.tokenization import TokenizedPair

if TYPE_CHECKING:
    from core.backend import Backend


@dataclass
class ReferenceLogps:
    index: np.ndarray  # int64 [N]: each pair's index in the loaded data
    chosen: np.ndarray  # float64 [N]
    rejected: np.ndarray  # float64 [N]

    def __post_init__(self) -> None:
        self._position = {int(i): p for p, i in enumerate(self.index)}

    def for_batch(self, pair_indices: np.ndarray) -> np.ndarray:
        """[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], matching a batch's row layout."""
        rows = np.array([self._position[int(i)] for i in pair_indices])
        return np.concatenate([self.chosen[rows], self.rejected[rows]])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"index": self.index, "chosen": self.chosen, "rejected": self.rejected}

    def rows(self) -> np.ndarray:
        """[N, 3] float64 (pair index, chosen, rejected): what ranks exchange."""
        return np.stack([self.index.astype(np.float64), self.chosen, self.rejected], axis=1)

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> ReferenceLogps:
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
        return cls(rows[:, 0].astype(np.int64), rows[:, 1].copy(), rows[:, 2].copy())

    @classmethod
    def from_file(cls, path: Path) -> ReferenceLogps:
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
        return cls(arrays["index"], arrays["chosen"], arrays["rejected"])


def reference_key(model_fingerprint: str, pairs: list[TokenizedPair], dtype: str, start_adapter: str | None) -> str:
    # v3: rows one by one at their own lengths and a shared row's attention in two parts (torch on a CPU)
    # changed the log-probs' rounding again, as the head's vocabulary blocks did for v2; values cached before
    # would leave a policy with a zero adapter a rounding error away from its reference (a first loss not log 2)
    return combine("duet-reference-v3", model_fingerprint, start_adapter or "-", dtype, tokens_fingerprint(pairs))


def compute_reference(
    backend: Backend,
    pairs: list[TokenizedPair],
    *,
    batch_size: int,
    pad_id: int,
    adapter: bool,
    pad_to_multiple_of: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> ReferenceLogps:
    """Log-probs of every pair under the reference model, with no gradient: longest first, in batches of
    about the tokens of ``batch_size`` of the longest pairs (see ``token_batches``)."""
    chosen = np.zeros(len(pairs))
    rejected = np.zeros(len(pairs))
    done = 0
    for rows in token_batches(pairs, batch_size):
        batch = collate([pairs[i] for i in rows], pad_id, pad_to_multiple_of)
        logps = backend.sequence_logps(batch, adapter=adapter)
        chosen[rows], rejected[rows] = logps[: len(rows)], logps[len(rows) :]
        faults.reach("reference.batch")
        done += len(rows)
        if progress is not None:
            progress(done, len(pairs))
    return ReferenceLogps(np.array([p.index for p in pairs], dtype=np.int64), chosen, rejected)


def token_batches(pairs: list[TokenizedPair], batch_size: int) -> list[list[int]]:
    """The pairs' indices longest first, cut into batches by tokens: each holds as many pairs as fit in the
    padded size of the first batch (``batch_size`` of the longest pairs). A pass of fixed pair counts runs its
    short pairs in batches a fraction of that size, each paying a forward's fixed costs for little work; by
    tokens, no batch is larger than the first, so memory peaks where it did."""
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].length)
    if not order:
        return []
    budget = batch_size * pairs[order[0]].length
    batches: list[list[int]] = [[]]
    for index in order:
        width = pairs[batches[-1][0]].length if batches[-1] else pairs[index].length  # sorted: the first is widest
        if batches[-1] and (len(batches[-1]) + 1) * width > budget:
            batches.append([])
        batches[-1].append(index)
    return batches


def load_or_compute(
    backend: Backend,
    pairs: list[TokenizedPair],
    key: str,
    cache_dir: Path,
    *,
    batch_size: int,
    pad_id: int,
    adapter: bool,
    pad_to_multiple_of: int = 1,
    progress: Callable[[int, int], None] | None = None,
    collective: Collective = SINGLE,
) -> tuple[ReferenceLogps, bool]:
    """(log-probs, whether they came from the cache). Under torchrun each rank computes its share and every
    rank ends with all of them; rank 0 alone reads and writes the cache."""
    path = cache_dir / "reference" / f"{key}.safetensors"
    cached = None
    if collective.is_main:
        remove_stale_temporaries(path.parent)  # what killed runs left; others' live writes are kept
        if path.is_file():
            try:
                cached = ReferenceLogps.from_file(path)
            except Exception:  # any damage (safetensors raises its own types): recompute and replace
                cached = None
            if cached is not None and len(cached.index) != len(pairs):
                cached = None
    if collective.any(cached is not None):
        rows = collective.gather(cached.rows() if cached is not None else np.zeros((0, 3)))  # rank 0's, to all
        return ReferenceLogps.from_rows(rows), True
    local = compute_reference(
        backend,
        collective.shard(pairs),
        batch_size=batch_size,
        pad_id=pad_id,
        adapter=adapter,
        pad_to_multiple_of=pad_to_multiple_of,
        progress=progress,
    )
    reference = ReferenceLogps.from_rows(collective.gather(local.rows()))
    if collective.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "pairs": str(len(pairs)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "backend": backend.name,
            "info": json.dumps(backend.info().__dict__, default=str),
        }
        write_safetensors(path, reference.arrays(), metadata)
    return reference, False
