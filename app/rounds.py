"""Iterative rounds, headless: sample two answers per prompt → a judge prefers one → train on those pairs →
judge held-out answers, round after round (``rounds.count`` > 0 in the run config).

The run directory::

    RUN/config.yaml, run.json, metrics.jsonl   the rounds' events, the training steps on one step axis
    RUN/rounds/eval-base.jsonl                  held-out answers of the model before any round
    RUN/rounds/round-N/pairs.jsonl              that round's judgements (a judgements file: it trains as is)
    RUN/rounds/round-N/train/                   that round's training: an ordinary run directory
    RUN/rounds/round-N/eval.jsonl, eval.json    held-out answers after the round, and the judge's figures
    RUN/adapter/                                the last round's adapter

Every phase leaves its result in a file, so ``--resume RUN`` continues at the round and phase a kill
interrupted: a judgements file resumes at its next prompt, a round's training resumes from its checkpoint
(bit-exact), an evaluation file at its next prompt; answers are seeded per round, prompt and answer, so a
resumed round samples what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from app.collect import (
    AnswerSampler,
    build_judge,
    collect_with_judge,
    judge_model_loader,
    load_sampler,
)
from app.events import Events
from core import faults
from core.atomic import atomic_directory, write_json
from core.checkpoint import latest_checkpoint
from core.collect import JudgementsFile, PromptItem, read_prompts
from core.config import Config, ConfigError
from core.errors import DataError, DuetError
from core.events import (
    CheckpointSaved,
    Evaluation,
    Event,
    Failed,
    Finished,
    Info,
    RoundReport,
    RunStarted,
    RunWarning,
    Stopped,
    TrainStep,
)
from core.judges import Judge, RuleJudge
from core.metrics import ConsoleReporter, MetricsLog, read_metrics, truncate_metrics
from core.prepare import resolve_data_source
from core.progress import PhaseProgress
from core.rundir import RunDirectory

EVAL_EVERY = 8  # with no held-out prompts given, every 8th prompt of the pool is held out


@dataclasses.dataclass
class RoundsResult:
    run_dir: Path
    adapter_dir: Path | None
    rounds: list[dict[str, Any]]
    stopped: bool = False
    events: list[Event] = dataclasses.field(default_factory=list, repr=False)


# ---------------------------------------------------------------------------------------------------------
# Prompts


def prompt_pools(config: Config) -> tuple[list[PromptItem], list[PromptItem]]:
    """(training prompts, held-out prompts), each without repeats."""
    pool = _distinct(read_prompts(config.rounds.prompts or resolve_data_source(config.data.train)))
    if config.rounds.eval_prompts:
        held_out = _distinct(read_prompts(config.rounds.eval_prompts))
    elif config.data.eval:
        held_out = _distinct(read_prompts(resolve_data_source(config.data.eval)))
    else:
        held_out = pool[EVAL_EVERY - 1 :: EVAL_EVERY]
    held_keys = {p.key for p in held_out}
    train = [p for p in pool if p.key not in held_keys]
    if not train:
        raise ConfigError("rounds: no training prompts are left once the held-out prompts are set aside.")
    if not held_out:
        raise ConfigError("rounds: no held-out prompts; give rounds.eval_prompts (a file of prompts).")
    return train, held_out


def _distinct(prompts: list[PromptItem]) -> list[PromptItem]:
    seen: set[str] = set()
    out = []
    for prompt in prompts:
        if prompt.key not in seen:
            seen.add(prompt.key)
            out.append(prompt)
    return out


def round_prompts(pool: list[PromptItem], number: int, count: int) -> list[PromptItem]:
    """Round ``number`` (1-based) takes the next ``count`` prompts of the pool, wrapping around."""
    start = (number - 1) * count
    return [pool[(start + i) % len(pool)] for i in range(min(count, len(pool)))]


# ---------------------------------------------------------------------------------------------------------
# The rounds


@dataclasses.dataclass
class Rounds:
    config: Config
    run_dir: RunDirectory
    emit: Events
    judge: Judge
    train_pool: list[PromptItem]
    held_out: list[PromptItem]
    callback: Callable[[Event], None] | None = None
    console: Any = None
    log: MetricsLog | None = None
    stopped: bool = False
    generator: AnswerSampler | None = None  # the model answers are sampled from, loaded once
    generator_adapter: str | None = None
    warned: set[str] = dataclasses.field(default_factory=set)  # warnings said once a rounds run, not once a round

    @property
    def folder(self) -> Path:
        return self.run_dir.path / "rounds"

    def round_dir(self, number: int) -> Path:
        return self.folder / f"round-{number}"

    def adapter_after(self, number: int) -> str | None:
        """The policy after round ``number`` (0: none, the base model)."""
        for earlier in range(number, 0, -1):
            adapter = self.round_dir(earlier) / "train" / "adapter"
            if adapter.is_dir():
                return str(adapter)
        return self.config.model.adapter

    def sampling_for(self, number: int) -> Config:
        """Round ``number``'s own seeds: a prompt asked again in a later round gets new answers."""
        sampling = dataclasses.replace(self.config.sampling, seed=self.config.sampling.seed * 1009 + number)
        return dataclasses.replace(self.config, sampling=sampling)

    # -- phases ---------------------------------------------------------------------------------------

    def run_all(self) -> list[dict[str, Any]]:
        total = self.config.rounds.count
        self._base_answers()
        reports = []
        for number in range(1, total + 1):
            done = self.round_dir(number) / "eval.json"
            if done.is_file():
                reports.append(json.loads(done.read_text()))
                continue
            self.round_dir(number).mkdir(parents=True, exist_ok=True)
            pairs = self._sample_and_judge(number)
            if not self._train(number, pairs):
                self.stopped = True
                return reports
            reports.append(self._evaluate(number))
        return reports

    def _report(self, number: int, phase: str, message: str, **fields: Any) -> None:
        self.emit(
            RoundReport(
                round=number,
                rounds=self.config.rounds.count,
                phase=phase,
                step_offset=(number - 1) * self.config.rounds.steps,
                message=message,
                **fields,
            )
        )

    def _sampler(self, config: Config, adapter: str | None, use_adapter: bool) -> AnswerSampler:
        """A sampler over one model kept for every round: each round's adapter is loaded into its LoRA
        layers instead of loading the model again."""
        if self.generator is None:
            self.generator = load_sampler(config, adapter=adapter, use_adapter=use_adapter)
            self.generator_adapter = adapter
        elif adapter is not None and adapter != self.generator_adapter:
            self.generator.backend.load_adapter(Path(adapter))
            self.generator_adapter = adapter
        on = use_adapter and adapter is not None
        return AnswerSampler(self.generator.backend, self.generator.chat, config.sampling, adapter=on)

    def _sample_and_judge(self, number: int) -> Counter[str]:
        rounds, path = self.config.rounds, self.round_dir(number) / "pairs.jsonl"
        prompts = round_prompts(self.train_pool, number, rounds.prompts_per_round)
        policy = self.adapter_after(number - 1)
        # the reference policy: the base when each round's reference is the base; otherwise the policy the
        # round starts from, which is also the current one
        use_adapter = rounds.policy == "current" or rounds.reference == "previous"
        who = "the current policy" if use_adapter and policy else "the base model"
        self._report(
            number,
            "sample",
            f"round {number}/{rounds.count}: sampling {len(prompts)} prompts × "
            f"{rounds.samples} answers from {who}, judged by {self.judge.name}",
        )
        config = self.sampling_for(number)
        sampler = self._sampler(config, policy, use_adapter)
        with JudgementsFile(path) as file:
            collect_with_judge(
                sampler,
                prompts,
                file,
                self.judge,
                config,
                samples=rounds.samples,
                progress=self._progress("sample", f"round {number}: sample and judge", "prompts"),
            )
            return file.counts()

    def _progress(self, phase: str, label: str, unit: str) -> Callable[[int, int], None]:
        # throttled, with a message (the line a log shows: count, elapsed, ETA), like every other long phase
        return PhaseProgress(self.emit, phase, label, 0, unit=unit)

    def _train(self, number: int, counts: Counter[str]) -> bool:
        """Train round ``number`` (or go on with its training); False when a signal stopped it."""
        from app.run import run

        rounds, folder = self.config.rounds, self.round_dir(number)
        preferences = counts["a"] + counts["b"]
        if preferences == 0:
            self._report(number, "train", f"round {number}: the judge preferred no answer (all ties); no training")
            return True
        train_dir = folder / "train"
        if (train_dir / "adapter").is_dir():
            return True
        if train_dir.exists() and latest_checkpoint(train_dir) is None:
            shutil.rmtree(train_dir)  # killed before its first checkpoint: nothing to continue, start again
        self._truncate_to_phase(number)
        self._report(
            number,
            "train",
            f"round {number}/{rounds.count}: training {rounds.steps} steps on {preferences} pairs "
            f"({counts['tie']} ties left out)",
            pairs=preferences,
            ties=counts["tie"],
        )
        forward = self._forwarder(number)
        quiet = Console(file=io.StringIO())  # the round's own lines reach the console through this log
        if train_dir.exists():
            result = run(
                resume=train_dir, callback=forward, console=quiet, on_ready=lambda *_: self._replay(number, train_dir)
            )
        else:
            result = run(self.round_config(number), callback=forward, console=quiet)
        faults.reach("rounds.trained")
        return not result.stopped

    def round_config(self, number: int) -> Config:
        """Round ``number``'s training: its judgements, from the policy it started with, for rounds.steps."""
        cfg, rounds = self.config, self.config.rounds
        folder = self.round_dir(number)
        return dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, train=str(folder / "pairs.jsonl"), eval=None, eval_fraction=0.0),
            model=dataclasses.replace(
                cfg.model,
                adapter=self.adapter_after(number - 1),
                reference="start" if rounds.reference == "previous" else "base",
            ),
            train=dataclasses.replace(
                cfg.train,
                max_steps=rounds.steps,
                output_dir=str(folder),
                run_name="train",
                sample_replies=0,
                eval_every=None,
            ),
            rounds=dataclasses.replace(rounds, count=0),
        )

    # -- the top-level log: training steps of every round on one axis ----------------------------------

    def _forwarder(self, number: int) -> Callable[[Event], None]:
        offset = (number - 1) * self.config.rounds.steps

        def forward(event: Event) -> None:
            if isinstance(event, (TrainStep, Evaluation, CheckpointSaved)):
                moved = dataclasses.replace(event, step=event.step + offset, time=None)
                if isinstance(moved, TrainStep):
                    moved.total_steps = self.config.rounds.count * self.config.rounds.steps
                self.emit(moved)
            elif not isinstance(event, (RunStarted, Finished, Stopped, Failed)):  # the rounds' own say those
                if isinstance(event, RunWarning):
                    if event.message in self.warned:
                        return  # each round's training loads the model again: its warnings are the same each time
                    self.warned.add(event.message)
                self.emit(dataclasses.replace(event, time=None))

        return forward

    def _phase_offset_file(self, number: int) -> Path:
        return self.round_dir(number) / "log-offset.json"

    def _truncate_to_phase(self, number: int) -> None:
        """A round's training resumed: cut the top-level log back to where that training began (its own
        log is replayed from the checkpoint's point), so no step is there twice."""
        marker = self._phase_offset_file(number)
        if self.log is None:
            return
        if marker.is_file():
            offset = json.loads(marker.read_text())["offset"]
            self.log.close()
            truncate_metrics(self.run_dir.metrics_file, offset)
            self.log = MetricsLog(self.run_dir.metrics_file)
            self.emit.sinks[0] = self.log
        else:
            write_json(marker, {"offset": self.log.offset()})

    def _replay(self, number: int, train_dir: Path) -> None:
        """What the resumed round logged before its checkpoint, into the top-level log (not printed again)."""
        offset = (number - 1) * self.config.rounds.steps
        for event in read_metrics(train_dir / "metrics.jsonl"):
            if isinstance(event, (TrainStep, Evaluation)) and self.log is not None:
                self.log(dataclasses.replace(event, step=event.step + offset))

    # -- held-out evaluation --------------------------------------------------------------------------

    def _base_answers(self) -> None:
        path = self.folder / "eval-base.jsonl"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._answer_held_out(path, self.config.model.adapter, label="the base model", number=0)

    def _answer_held_out(self, path: Path, adapter: str | None, label: str, number: int) -> list[dict[str, Any]]:
        """One sampled answer per held-out prompt (seeded per prompt: the same in every round, so rounds
        are compared on equal draws), appended line by line to ``path``; resumes where it stopped."""
        rows = _read_answers(path)
        todo = self.held_out[len(rows) :]
        if todo:
            sampling = dataclasses.replace(self.config.sampling, seed=self.config.sampling.seed + 7)
            config = dataclasses.replace(self.config, sampling=sampling)
            sampler = self._sampler(config, adapter, adapter is not None)
            progress = self._progress("evaluate", f"held-out answers of {label}", "prompts")
            k, first = self.config.rounds.eval_samples, len(rows)
            with open(path, "a", encoding="utf-8") as handle:
                for start in range(0, len(todo), 8):  # 8 prompts' answers in one batch
                    chunk = [sampler.start(p, first + start + i, k=k) for i, p in enumerate(todo[start : start + 8])]
                    sampler.fill_many(chunk)
                    for answers in chunk:
                        if answers.error:
                            raise DataError(answers.error)
                        row = {"prompt_key": answers.prompt.key, "answers": answers.texts, "seeds": answers.seeds}
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                        handle.flush()
                        os.fsync(handle.fileno())
                        rows.append(row)
                        faults.reach("rounds.eval_answer")
                    # once a batch, counting this call's prompts (an ETA from time spent now), as collect_with_judge
                    progress(len(rows) - first, len(todo))
        return rows

    def _evaluate(self, number: int) -> dict[str, Any]:
        folder = self.round_dir(number)
        self._report(number, "evaluate", f"round {number}: answering {len(self.held_out)} held-out prompts")
        current = self._answer_held_out(folder / "eval.jsonl", self.adapter_after(number), f"round {number}", number)
        base = _read_answers(self.folder / "eval-base.jsonl")
        previous = base if number == 1 else _read_answers(self.round_dir(number - 1) / "eval.jsonl")
        versus_base = self._compare(current, base)
        versus_previous = self._compare(current, previous)
        figures: dict[str, Any] = {
            "round": number,
            "vs_base": versus_base,
            "vs_previous": versus_previous,
            "held_out_prompts": len(self.held_out),
            "adapter": self.adapter_after(number),
        }
        if isinstance(self.judge, RuleJudge) and self.judge.kind == "score":
            figures["mean_score"] = self._mean_score(current)
            figures["mean_score_base"] = self._mean_score(base)
        figures["mean_words"] = _mean([len(a.split()) for row in current for a in row["answers"]])
        counts = _verdict_counts(folder / "pairs.jsonl")
        figures["pairs"], figures["ties"] = counts["a"] + counts["b"], counts["tie"]
        write_json(folder / "eval.json", figures)
        score = (
            f", mean score {figures['mean_score']:.3f} (base {figures['mean_score_base']:.3f})"
            if "mean_score" in figures
            else ""
        )
        self._report(
            number,
            "done",
            f"round {number}/{self.config.rounds.count}: win rate {versus_base['win_rate']:.2f} over the base, "
            f"{versus_previous['win_rate']:.2f} over the previous round{score}",
            pairs=figures["pairs"],
            ties=figures["ties"],
            win_rate_vs_base=versus_base["win_rate"],
            win_rate_vs_previous=versus_previous["win_rate"],
            mean_score=figures.get("mean_score"),
            figures=figures,
        )
        return figures

    def _mean_score(self, rows: list[dict[str, Any]]) -> float:
        assert isinstance(self.judge, RuleJudge)
        return _mean(
            [self.judge.score(p.text, a) for p, row in zip(self.held_out, rows, strict=True) for a in row["answers"]]
        )

    def _compare(self, ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
        wins = ties = losses = 0
        pairs = [
            (prompt, a, b)
            for prompt, mine, other in zip(self.held_out, ours, theirs, strict=True)
            for a, b in zip(mine["answers"], other["answers"], strict=True)
        ]
        for prompt, a, b in pairs:  # answer i of one policy against answer i (the same seed) of the other
            if a == b:
                ties += 1
                continue
            winner = self.judge.judge(prompt.text, a, b).winner
            wins += winner == "a"
            losses += winner == "b"
            ties += winner == "tie"
        total = wins + ties + losses
        return {"wins": wins, "ties": ties, "losses": losses, "win_rate": (wins + ties / 2) / total if total else 0.5}


def _verdict_counts(path: Path) -> Counter[str]:
    if not path.is_file():
        return Counter()
    with JudgementsFile(path) as file:
        return file.counts()


def _read_answers(path: Path) -> list[dict[str, Any]]:
    """The complete lines of an answers file (a line cut short by a kill is dropped, and cut off the file)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------------------------------------------
# Entry: a new rounds run, or one resumed


def run_rounds(
    config: Config,
    *,
    resume: RunDirectory | None = None,
    callback: Callable[[Event], None] | None = None,
    console: Any = None,
) -> RoundsResult:
    """Run ``config.rounds.count`` rounds in a new run directory, or go on with those of ``resume``."""
    from rich.console import Console

    console = console or Console(soft_wrap=True)
    train_pool, held_out = prompt_pools(config)
    judge = build_judge(config.judge, judge_model_loader(config))
    run_dir = resume or RunDirectory.create(config)
    with run_dir.lock():
        run_dir.remove_stale_temporaries()
        reporter = ConsoleReporter(console)
        rounds = Rounds(config, run_dir, Events([]), judge, train_pool, held_out, callback, console)
        rounds.log = MetricsLog(run_dir.metrics_file)
        rounds.emit.sinks = [rounds.log, reporter, *([callback] if callback else [])]
        try:
            return _run(rounds)
        except BaseException as exc:
            rounds.emit(Failed(message=str(exc) if isinstance(exc, DuetError) else f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            reporter.close()
            if rounds.log is not None:
                rounds.log.close()


def _run(rounds: Rounds) -> RoundsResult:
    config, run_dir, emit = rounds.config, rounds.run_dir, rounds.emit
    emit(
        Info(
            message=f"{config.rounds.count} rounds in {run_dir.path}: {len(rounds.train_pool)} training prompts, "
            f"{len(rounds.held_out)} held out, judged by {rounds.judge.name}"
        )
    )
    reports = rounds.run_all()
    if rounds.stopped:
        emit(
            Stopped(
                step=0, reason="signal", message=f"stopped; resume with: python -m core.run --resume {run_dir.path}"
            )
        )
        return RoundsResult(run_dir.path, None, reports, stopped=True, events=emit.history)
    final = rounds.adapter_after(config.rounds.count)
    adapter_dir = None
    if final is not None and Path(final).is_dir():
        with atomic_directory(run_dir.adapter_dir, replace=True) as folder:
            for item in Path(final).iterdir():
                if item.is_file():
                    shutil.copy2(item, folder / item.name)
        adapter_dir = run_dir.adapter_dir
    emit(
        Finished(
            step=config.rounds.count * config.rounds.steps,
            adapter=str(adapter_dir or ""),
            message=f"done: {config.rounds.count} rounds; the adapter is in {adapter_dir}",
        )
    )
    return RoundsResult(run_dir.path, adapter_dir, reports, events=emit.history)
