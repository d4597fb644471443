"""``duet eval``: what training changed. The tuned model and its base answer the same held-out prompts with
the same seeds; a judge compares each pair in both orders; the report gives the win rate with its interval, the
win rate at equal length, KL from the base on the tuned model's own samples, lengths and degeneration checks.

- `resolve_target` reads what to evaluate: a run folder, its adapter, or one of its checkpoints.
- `evaluate_loaded` does the work on a backend that already holds the model (the training one, at the end of
  a run; or one `evaluate` loads).
- `evaluate` is the entry of ``duet eval RUN``; `compare` puts several runs' reports side by side.

The answers themselves (generation, the cache, scoring for KL) are in `app.eval_answers`; a person's blind
A/B in `app.blind`. Answers are cached by backend, model, adapter, prompts and sampling settings: evaluating
again (another judge, a re-run) generates nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.blind import BLIND_FILE
from app.collect import AnswerSampler, build_judge, judge_model_loader
from app.eval_answers import AnswerCache, AnswerSet, answer_logps, generate_answers, kl_sampling
from core.collect import JudgementsFile, PromptItem, read_prompts
from core.config import Config, SamplingConfig
from core.errors import ConfigError, DataError, DuetError
from core.evaluation.report import render_compare, write_report
from core.evaluation.stats import degeneration, kl_from_samples, length_controlled_win_rate, win_rate
from core.events import Event, Info
from core.fingerprint import cache_root
from core.judges import Judge, ModelJudge, RuleJudge
from core.metrics import read_metrics
from core.progress import PhaseProgress
from core.rundir import RunDirectory
from core.tokenization import ChatTokenizer

REPORT_FOLDER = "eval"


class EvalError(DuetError):
    pass


@dataclass
class Target:
    """What is evaluated: an adapter on its base model, with the run's config when it comes from a run."""

    config: Config
    adapter: Path
    run_dir: Path | None
    label: str
    step: int | None = None


def resolve_target(source: str | Path, overrides: Sequence[str] = ()) -> Target:
    """A run folder (its final adapter), a checkpoint folder inside a run, or a bare adapter folder."""
    path = Path(source).expanduser().resolve()
    if (path / "config.yaml").is_file() and (path / "metrics.jsonl").exists():
        run = RunDirectory.open(path)
        if not run.adapter_dir.is_dir():
            raise EvalError(
                f"{path}: the run has no final adapter yet (it was stopped or is still training). Resume it "
                f"with `python -m core.run --resume {path}`, or evaluate a checkpoint: {path}/checkpoints/step-…"
            )
        return Target(run.load_config(overrides), run.adapter_dir, path, path.name, _run_steps(path))
    if (path / "adapter_config.json").is_file():
        run_dir = next(
            (p for p in path.parents if (p / "config.yaml").is_file() and (p / "metrics.jsonl").exists()), None
        )
        if run_dir is not None:
            config = RunDirectory.open(run_dir).load_config(overrides)
            step = _checkpoint_step(path)
            return Target(config, path, run_dir, f"{run_dir.name}:{path.name}", step)
        from app.settings import resolve_config

        config = resolve_config(None, [*overrides, *_base_model_override(path, overrides)])
        return Target(config, path, None, path.name)
    raise EvalError(
        f"{source}: not a run folder (config.yaml, metrics.jsonl), a checkpoint or an adapter folder "
        "(adapter_config.json). Give the folder a run wrote under train.output_dir."
    )


def _base_model_override(adapter: Path, overrides: Sequence[str]) -> list[str]:
    if any(o.startswith("model.path=") for o in overrides):
        return []
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise EvalError(f"{adapter}: the adapter does not name its base model; give model.path=…")
    return [f"model.path={base}"]


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def _run_steps(run_dir: Path) -> int | None:
    steps = [e["step"] for e in read_metrics(run_dir / "metrics.jsonl") if e.get("type") == "train"]
    return max(steps) if steps else None


# ---------------------------------------------------------------------------------------------------------
# Prompts


def held_out_prompts(config: Config, chat: ChatTokenizer, prompts: str | None) -> tuple[list[PromptItem], str]:
    """(prompts, where they came from): a prompts file, else the distinct prompts of the run's eval split."""
    limit = config.evaluation.max_prompts
    if prompts:
        items = read_prompts(prompts)
        source = str(prompts)
    else:
        from core.prepare import prepare_data, unpaired_needs

        if not config.data.eval and config.data.eval_fraction <= 0:
            raise ConfigError(
                "duet eval: the run has no held-out split (data.eval, data.eval_fraction); give held-out "
                "prompts with --prompts FILE or evaluation.prompts."
            )
        data = prepare_data(
            config.data,
            chat.tokenizer,
            config.train.seed,
            cache_root(config.train.cache_dir),
            unpaired=unpaired_needs(config.objective),
        )
        assert data.eval is not None
        items = []
        for tokenized in data.eval.tokenized:
            pair = data.eval.pairs[tokenized.index]
            messages = tuple((m["role"], m["content"]) for m in pair.conversation())
            location = str(pair.location) if pair.location is not None else "held-out split"
            items.append(PromptItem(messages, location))
        source = "the run's held-out split"
    seen: set[str] = set()
    distinct = [p for p in items if not (p.key in seen or seen.add(p.key))]
    if not distinct:
        raise DataError(f"{source}: no prompts to evaluate on.")
    return distinct[:limit], source


# ---------------------------------------------------------------------------------------------------------
# Judging, KL


def judged_outcome(judge: Judge, prompt: str, tuned: str, base: str) -> float:
    """1 when the judge prefers the tuned answer, 0 the base's, 0.5 a tie. Each pair in both orders: a model
    judge does that itself (a disagreement is a tie); a rule's ``prefer`` is asked both ways here, since a
    rule can have a position bias too. Identical answers tie without asking."""
    if tuned == base:
        return 0.5
    first = judge.judge(prompt, tuned, base).winner
    if isinstance(judge, RuleJudge) and judge.kind == "prefer":
        second = {"a": "b", "b": "a"}.get(judge.judge(prompt, base, tuned).winner, "tie")
        if second != first:
            judge.stats.inconsistent += 1
            return 0.5
    return {"a": 1.0, "b": 0.0}.get(first, 0.5)


# ---------------------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class EvalResult:
    report: dict[str, Any]
    answers: list[dict[str, Any]]
    folder: Path | None = None


@dataclass
class _Context:
    backend: Any
    chat: ChatTokenizer
    config: Config
    target: Target
    cache: AnswerCache
    emit: Callable[[Event], None]
    prompts: list[PromptItem] = field(default_factory=list)

    def sampler(self, sampling: SamplingConfig, adapter: bool) -> AnswerSampler:
        return AnswerSampler(self.backend, self.chat, sampling, adapter=adapter)

    def answers(
        self, label: str, adapter_path: Path | None, sampling: SamplingConfig, n: int, attempt: int
    ) -> AnswerSet:
        """``n`` answers per prompt with ``adapter_path`` loaded (None: the base model alone), from the cache
        when the same model, adapter, prompts and settings were answered before."""
        model = getattr(self.backend, "model_location", self.config.model.path)
        # the backend too: torch and MLX draw different answers from one seed
        key = self.cache.key(self.backend.name, model, adapter_path, self.prompts, sampling, n, attempt)
        cached = self.cache.get(key)
        if cached is not None:
            self.emit(Info(message=f"{label}: {len(self.prompts)} prompts' answers from the cache"))
            return cached
        if adapter_path is not None:
            self.backend.load_adapter(adapter_path)
        progress = PhaseProgress(self.emit, "evaluate", label, len(self.prompts), unit="prompts")
        answers = generate_answers(self.sampler(sampling, adapter_path is not None), self.prompts, n, attempt, progress)
        self.cache.put(key, answers)
        return answers

    def kl(self, adapter_path: Path, label: str) -> dict[str, Any] | None:
        count = self.config.evaluation.kl_samples
        if count == 0:
            return None
        sampling = kl_sampling(self.config.sampling)
        samples = self.answers(f"{label}: samples at temperature 1 for KL", adapter_path, sampling, count, attempt=1)
        self.backend.load_adapter(adapter_path)
        prompt_ids = [self.chat.prompt_ids(p.conversation) for p in self.prompts for _ in range(count)]
        tokens, finished = samples.flat_tokens(), samples.flat_finished()
        self.emit(Info(message=f"{label}: scoring {len(tokens)} samples under the tuned and the base model"))
        tuned = answer_logps(self.backend, self.chat, prompt_ids, tokens, finished, adapter=True)
        base = answer_logps(self.backend, self.chat, prompt_ids, tokens, finished, adapter=False)
        counts = [len(t) + int(f) for t, f in zip(tokens, finished, strict=True)]
        return kl_from_samples(tuned.tolist(), base.tolist(), counts).as_dict()


def _outcomes(
    judge: Judge | None, prompts: list[PromptItem], tuned: AnswerSet, base: AnswerSet
) -> tuple[list[float], list[str], list[float]] | None:
    """(outcomes, their prompts' keys, length differences in tokens) of answer i of each model to each prompt."""
    if judge is None:
        return None
    outcomes, groups, lengths = [], [], []
    for p, mine, theirs, my_tokens, their_tokens in zip(
        prompts, tuned.texts, base.texts, tuned.tokens, base.tokens, strict=True
    ):
        for a, b, ta, tb in zip(mine, theirs, my_tokens, their_tokens, strict=True):
            outcomes.append(judged_outcome(judge, p.text, a, b))
            groups.append(p.key)
            lengths.append(float(len(ta) - len(tb)))
    return outcomes, groups, lengths


def _judge_figures(judge: Judge, kind: str, outcomes: list[float], groups: list[str]) -> dict[str, Any]:
    """The judge's verdicts as a win rate with its interval, and how far its two orders agreed."""
    figures = win_rate(outcomes, groups).as_dict()
    stats = judge.stats
    consistency, both_orders = stats.consistency, True
    if isinstance(judge, RuleJudge):
        if judge.kind == "prefer":  # asked twice per pair it judged (identical answers tie unasked)
            consistency = 1.0 - stats.inconsistent / max(1, stats.judged // 2)
        else:  # a score rule scores each answer alone: the order cannot matter, so it is asked once
            kind, consistency, both_orders = "score rule", None, None
    return {
        "name": judge.name,
        "kind": kind,
        **figures,
        "both_orders": both_orders,
        "consistency": consistency,
        "no_verdict": stats.no_verdict,
    }


def human_figures(run_dir: Path | None, adapter_fingerprint: str) -> dict[str, Any] | None:
    """The person's blind A/B verdicts on this adapter (``RUN/blind-ab.jsonl``): tuned over base."""
    if run_dir is None or not (run_dir / BLIND_FILE).is_file():
        return None
    with JudgementsFile(run_dir / BLIND_FILE) as file:
        records = [r["duet"] for r in file.records]
    scores = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
    outcomes, groups = [], []
    for meta in records:
        if (
            meta.get("adapter_fingerprint") not in (None, (adapter_fingerprint or "")[:16])
            or meta["verdict"] not in scores
        ):
            continue
        tuned_side = (meta.get("sides") or {"a": "tuned"}).get("a") == "tuned"
        score = scores[meta["verdict"]]
        outcomes.append(score if tuned_side else 1.0 - score)
        groups.append(meta["prompt_key"])
    if not outcomes:
        return None
    return {
        "name": "human (blind A/B)",
        "kind": "human",
        **win_rate(outcomes, groups).as_dict(),
        "both_orders": False,
        "consistency": None,
    }


def _pairs_figures(run_dir: Path | None, step: int | None) -> dict[str, Any] | None:
    """Held-out pairs (reward accuracy, margin, loss) as the run logged them at ``step`` (its last eval when
    ``step`` is None)."""
    if run_dir is None or not (run_dir / "metrics.jsonl").exists():
        return None
    events = [e for e in read_metrics(run_dir / "metrics.jsonl") if e.get("type") == "eval"]
    if step is not None:
        events = [e for e in events if e.get("step") == step] or []
    if not events:
        return None
    last = events[-1]
    return {
        "step": last.get("step"),
        "reward_accuracy": last.get("eval_rewards/accuracies"),
        "margin": last.get("eval_rewards/margins"),
        "loss": last.get("eval_loss"),
        "margins": last.get("eval_margins"),
    }


def _training(config: Config, step: int | None) -> dict[str, Any]:
    return {
        "objective": config.objective.name,
        "beta": config.objective.resolved_beta,
        "steps": step,
        "lr": config.train.lr,
    }


def _examples(
    prompts: list[PromptItem], tuned: AnswerSet, base: AnswerSet, outcomes: list[float] | None, count: int
) -> list[dict[str, Any]]:
    samples = len(tuned.texts[0]) if tuned.texts else 1
    verdicts = {1.0: "tuned", 0.0: "base", 0.5: "tie"}
    rows = []
    for i, prompt in enumerate(prompts[:count]):
        outcome = None if outcomes is None else outcomes[i * samples]
        rows.append(
            {
                "prompt": prompt.text,
                "base": base.texts[i][0],
                "tuned": tuned.texts[i][0],
                "verdict": verdicts.get(outcome) if outcome is not None else None,
            }
        )
    return rows


def _answers_rows(
    prompts: list[PromptItem], tuned: AnswerSet, base: AnswerSet, outcomes: list[float] | None
) -> list[dict[str, Any]]:
    rows, k = [], 0
    for i, prompt in enumerate(prompts):
        for j in range(len(tuned.texts[i])):
            rows.append(
                {
                    "prompt_key": prompt.key,
                    "prompt": prompt.text,
                    "sample": j,
                    "tuned": tuned.texts[i][j],
                    "base": base.texts[i][j],
                    "tuned_tokens": len(tuned.tokens[i][j]),
                    "base_tokens": len(base.tokens[i][j]),
                    "outcome": None if outcomes is None else outcomes[k],
                }
            )
            k += 1
    return rows


def evaluate_loaded(
    backend: Any,
    chat: ChatTokenizer,
    config: Config,
    target: Target,
    *,
    judge: Judge | None,
    prompts: str | None = None,
    base_adapter: Path | None = None,
    checkpoints: bool = False,
    out: Path | None = None,
    emit: Callable[[Event], None] = lambda event: None,
) -> EvalResult:
    """Tuned (``target.adapter``) against base (the model alone, or ``base_adapter``) on held-out prompts;
    the report is written atomically into ``out`` when given. The backend holds the model (any adapter)."""
    started = time.monotonic()
    context = _Context(backend, chat, config, target, AnswerCache(config), emit)
    context.prompts, source = held_out_prompts(config, chat, prompts or config.evaluation.prompts)
    evaluation = config.evaluation
    sampling = dataclasses.replace(config.sampling, temperature=0.0) if evaluation.greedy else config.sampling
    n = 1 if evaluation.greedy else evaluation.samples
    emit(Info(message=f"evaluating {target.label} on {len(context.prompts)} prompts ({source}), {n} answer(s) each"))

    base = context.answers("base answers", base_adapter, sampling, n, attempt=0)
    tuned = context.answers("tuned answers", target.adapter, sampling, n, attempt=0)
    judged = _outcomes(judge, context.prompts, tuned, base)
    judge_figures = lc = None
    if judged is not None and judge is not None:
        outcomes, groups, differences = judged
        judge_figures = _judge_figures(judge, "model" if isinstance(judge, ModelJudge) else "rule", outcomes, groups)
        fitted = length_controlled_win_rate(outcomes, differences)
        lc = None if fitted is None else fitted.as_dict()
    kl = context.kl(target.adapter, "tuned")

    checkpoint_rows = None
    if checkpoints:
        checkpoint_rows = _checkpoint_rows(context, judge, sampling, n, base)
        backend.load_adapter(target.adapter)

    fingerprint = context.cache.fingerprint(target.adapter)
    report: dict[str, Any] = {
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": str(target.run_dir) if target.run_dir else None,
        "adapter": str(target.adapter),
        "base": str(base_adapter) if base_adapter else config.model.path,
        "training": _training(config, target.step),
        "settings": {
            "prompts": source,
            "num_prompts": len(context.prompts),
            "samples": n,
            "greedy": evaluation.greedy,
            "sampling": dataclasses.asdict(sampling),
            "kl_samples": evaluation.kl_samples,
            "judge": None if judge is None else judge.name,
            "backend": backend.name,
        },
        "judge": judge_figures,
        "length_controlled": lc,
        "human": human_figures(target.run_dir, fingerprint),
        "lengths": {"base": [len(t) for t in base.flat_tokens()], "tuned": [len(t) for t in tuned.flat_tokens()]},
        "degeneration": {
            "base": degeneration(base.flat_tokens(), base.flat_finished()).as_dict(),
            "tuned": degeneration(tuned.flat_tokens(), tuned.flat_finished()).as_dict(),
        },
        "kl": kl,
        "pairs": _pairs_figures(
            target.run_dir, target.step if target.step is not None and target.adapter.name.startswith("step-") else None
        ),
        "examples": _examples(context.prompts, tuned, base, None if judged is None else judged[0], evaluation.examples),
        "checkpoints": checkpoint_rows,
        "seconds": round(time.monotonic() - started, 1),
    }
    rows = _answers_rows(context.prompts, tuned, base, None if judged is None else judged[0])
    folder = write_report(out, report, rows) if out is not None else None
    return EvalResult(report, rows, folder)


def _checkpoint_rows(
    context: _Context, judge: Judge | None, sampling: SamplingConfig, n: int, base: AnswerSet
) -> list[dict[str, Any]]:
    """Win rate, KL and length at every checkpoint the run kept, then at its final adapter."""
    run_dir = context.target.run_dir
    if run_dir is None:
        raise EvalError("--checkpoints needs a run folder (its checkpoints/ folder), not a bare adapter.")
    folders = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: _checkpoint_step(p) or 0)
    entries = [(_checkpoint_step(p), p) for p in folders if (p / "adapter_config.json").is_file()]
    final_step = _run_steps(run_dir)
    if context.target.adapter.is_dir() and all(step != final_step for step, _ in entries):
        entries.append((final_step, context.target.adapter))
    if not entries:
        raise EvalError(f"{run_dir}: no checkpoints kept (train.save_every, train.keep_checkpoints).")
    rows = []
    for step, folder in entries:
        label = f"step {step}"
        tuned = context.answers(f"{label}: answers", folder, sampling, n, attempt=0)
        judged = _outcomes(judge, context.prompts, tuned, base)
        lengths = [len(t) for t in tuned.flat_tokens()]
        rows.append(
            {
                "step": step,
                "judge": None if judged is None else win_rate(judged[0], judged[1]).as_dict(),
                "kl": context.kl(folder, label),
                "mean_tokens": float(np.mean(lengths)) if lengths else None,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------
# Entry points


def load_judge(config: Config) -> Judge | None:
    """The rule or model judge of the config; None when a person judges (the blind A/B screen)."""
    if config.judge.kind == "human":
        return None
    return build_judge(config.judge, judge_model_loader(config))


def evaluate(
    source: str | Path,
    *,
    overrides: Sequence[str] = (),
    prompts: str | None = None,
    base: str | Path | None = None,
    checkpoints: bool = False,
    out: str | Path | None = None,
    emit: Callable[[Event], None] = lambda event: None,
) -> EvalResult:
    """``duet eval RUN``: loads the model with the run's settings and writes the report into ``RUN/eval``
    (or ``out``)."""
    from app.collect import load_sampler

    target = resolve_target(source, overrides)
    config = target.config
    judge = load_judge(config)
    base_adapter = None
    if base is not None:
        base_target = resolve_target(base, overrides)
        if base_target.config.model.path != config.model.path:
            raise EvalError(
                f"--base {base}: trained on {base_target.config.model.path}, not on {config.model.path}; both "
                "sides must share the base model (compare two runs of one model)."
            )
        base_adapter = base_target.adapter
    sampler = load_sampler(config, adapter=str(target.adapter), use_adapter=True, emit=emit)
    folder = (
        Path(out)
        if out is not None
        else (target.run_dir / REPORT_FOLDER if target.run_dir else target.adapter / REPORT_FOLDER)
    )
    return evaluate_loaded(
        sampler.backend,
        sampler.chat,
        config,
        target,
        judge=judge,
        prompts=prompts,
        base_adapter=base_adapter,
        checkpoints=checkpoints,
        out=folder,
        emit=emit,
    )


def headline(report: dict[str, Any]) -> str:
    """The report's headline in a few lines (the terminal's view of eval.md)."""
    lines = []
    judge, lc, kl = report.get("judge"), report.get("length_controlled"), report.get("kl")
    if judge:
        lines.append(
            f"{judge['name']}: tuned wins {judge['wins']}, ties {judge['ties']}, loses {judge['losses']} of "
            f"{judge['n']}: win rate {judge['rate']:.2f} [{judge['low']:.2f}, {judge['high']:.2f}]"
            + ("" if judge.get("consistency") is None else f"; both orders agreed on {judge['consistency']:.0%}")
        )
    if lc:
        lines.append(f"at equal length: {lc['rate']:.2f} [{lc['low']:.2f}, {lc['high']:.2f}]")
    human = report.get("human")
    if human:
        lines.append(
            f"you (blind A/B): {human['rate']:.2f} [{human['low']:.2f}, {human['high']:.2f}] over {human['n']}"
        )
    base, tuned = report["degeneration"]["base"], report["degeneration"]["tuned"]
    if base.get("mean_tokens") is not None and tuned.get("mean_tokens") is not None:
        lines.append(f"mean length {base['mean_tokens']:.1f} → {tuned['mean_tokens']:.1f} tokens")
    if kl:
        lines.append(
            f"KL from the base {kl['per_answer']:.2f} nats per answer [{kl['low']:.2f}, {kl['high']:.2f}], "
            f"{kl['per_token']:.3f} per token"
        )
    for row in report.get("checkpoints") or []:
        rate = "n/a" if not row.get("judge") else f"{row['judge']['rate']:.2f}"
        kl_row = "n/a" if not row.get("kl") else f"{row['kl']['per_answer']:.2f}"
        length = "n/a" if row.get("mean_tokens") is None else f"{row['mean_tokens']:.1f}"
        lines.append(f"  step {row['step']}: win rate {rate}, KL {kl_row}, mean length {length}")
    return "\n".join(lines)


def compare(sources: Sequence[str | Path]) -> str:
    """The side-by-side table of several runs' reports (each ``RUN/eval/eval.json``, written by duet eval)."""
    reports = []
    for source in sources:
        path = Path(source)
        file = path if path.suffix == ".json" else path / REPORT_FOLDER / "eval.json"
        if not file.is_file():
            raise EvalError(f"{source}: no evaluation report ({file}); run `duet eval {source}` first.")
        label = path.parent.parent.name if path.suffix == ".json" else path.name
        reports.append((label, json.loads(file.read_text(encoding="utf-8"))))
    return render_compare(reports)
