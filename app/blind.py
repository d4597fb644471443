"""A person's blind A/B of a run: tuned and base answers to the same prompt, sides hidden, judged in the
Collect screen; ``duet eval`` reports the person's win rate from the file."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.collect import Answers, AnswerSampler, CollectSession, load_sampler
from core.collect import JudgementsFile
from core.config import SamplingConfig
from core.tokenization import ChatTokenizer

if TYPE_CHECKING:
    from app.evaluate import Target

BLIND_FILE = "blind-ab.jsonl"  # a person's blind A/B judgements of a run (the TUI's Eval screen writes it)


class PairedSampler(AnswerSampler):
    """Answer "a" from the tuned model (adapter on), answer "b" from the base (adapter off), with the same
    seed: the Collect screen shows them in random order, so a person judges them blind. Every line written
    records which side was which (``sides``)."""

    def __init__(self, backend: Any, chat: ChatTokenizer, sampling: SamplingConfig) -> None:
        super().__init__(backend, chat, sampling, adapter=True)
        self.provenance_extra = {"sides": {"a": "tuned", "b": "base"}, "blind_ab": True}

    def fill_many(self, batch: list[Answers], on_update: Callable[[Answers], None] | None = None) -> None:
        halves: list[tuple[Answers, Answers, Answers]] = []
        for answers in batch:
            answers.seeds = [answers.seeds[0], answers.seeds[0]]  # common random numbers: same seed, two models
            answers.temperatures = [self.sampling.temperature] * 2
            tuned, base = (
                Answers(
                    answers.prompt,
                    answers.index,
                    answers.attempt,
                    [answers.seeds[0]],
                    [answers.temperatures[0]],
                    [""],
                    [[]],
                )
                for _ in range(2)
            )
            halves.append((answers, tuned, base))

        def merged(side: int) -> Callable[[Answers], None]:
            def update(part: Answers) -> None:
                for whole, tuned, base in halves:
                    if part is (tuned, base)[side]:
                        whole.texts[side], whole.token_ids[side] = part.texts[0], part.token_ids[0]
                        whole.error = whole.error or part.error
                        if on_update is not None and not part.done:
                            on_update(whole)

            return update

        # the side's adapter goes with the call: the session reads `self.adapter` (on: the tuned model) for the
        # lines it writes, from another thread, while the next batch generates
        for side, adapter in ((0, True), (1, False)):
            super().fill_many([h[1 + side] for h in halves], merged(side), adapter=adapter)
        for whole, tuned, base in halves:
            whole.error = tuned.error or base.error
            whole.done = True
            whole.seconds = tuned.seconds + base.seconds
            if on_update is not None:
                on_update(whole)


def blind_file(target: Target) -> Path:
    """Where a run's (or a bare adapter's) blind verdicts are kept."""
    return (target.run_dir if target.run_dir is not None else target.adapter) / BLIND_FILE


def open_blind_session(
    source: str | Path,
    *,
    overrides: Sequence[str] = (),
    prompts: str | None = None,
    on_update: Callable[[Answers], None] | None = None,
    ahead: int = 4,
) -> CollectSession:
    """The Collect screen's session for a blind A/B of a run: its held-out prompts, the tuned and the base
    answer to each, a person's verdicts appended to ``RUN/blind-ab.jsonl`` (reopened: it resumes). The next
    ``duet eval`` of the run reports the person's win rate. Loads the model: call it off the UI thread."""
    from app.evaluate import held_out_prompts, resolve_target  # app.evaluate reads this module's file

    target = resolve_target(source, overrides)
    config = target.config
    loaded = load_sampler(config, adapter=str(target.adapter), use_adapter=True)
    items, _ = held_out_prompts(config, loaded.chat, prompts or config.evaluation.prompts)
    sampler = PairedSampler(loaded.backend, loaded.chat, config.sampling)
    file = JudgementsFile(blind_file(target))
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, adapter=str(target.adapter)))
    return CollectSession(
        sampler, items, file, config, judge_name="human (blind A/B)", ahead=ahead, on_update=on_update
    )
