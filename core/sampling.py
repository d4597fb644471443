"""Each generated row's sampling settings, the same for every backend."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowSampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int = 0
    repetition_penalty: float = 1.0  # > 1 discourages every token already in the prompt or the answer


def sampling_rows(
    count: int,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int,
    seeds: list[int] | None,
    temperatures: list[float] | None,
    repetition_penalty: float,
) -> list[RowSampling]:
    """The settings of ``count`` rows as the backend contract's ``generate`` takes them: a row's own seed and
    temperature when given (``seeds``, ``temperatures``), else ``seed + row`` and the shared temperature."""
    return [
        RowSampling(
            temperature=temperatures[index] if temperatures else temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seeds[index] if seeds else seed + index,
            repetition_penalty=repetition_penalty,
        )
        for index in range(count)
    ]
