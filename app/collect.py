"""Collecting preferences: answers sampled from the user's model, a judge's verdicts, the judgements file.

- `AnswerSampler` samples k answers to a prompt from a loaded backend, each with its own recorded seed
  (derived from ``sampling.seed``, the prompt and the attempt, so a regenerated pair differs and a re-run
  gives the same answers), with the adapter on or off.
- `build_judge` turns the ``judge`` config into a rule judge or a model judge (a second model, loaded here).
- `CollectSession` is what the Collect screen drives: the prompts still to judge, a background thread that
  keeps answers generated ahead of the person, and the judgement keys (a, b, tie, both bad, edit, skip,
  regenerate, undo) each written to the file at once.
- `ThumbsSession` is the same with one answer per prompt and a thumbs up or down on it (``duet collect
  --thumbs``): unpaired feedback, for KTO.
- `collect_with_judge` is the same loop with a rule or model judge instead of a person (``duet collect
  --judge rule``).
"""

from __future__ import annotations

import dataclasses
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import faults
from core.collect import (
    PAIRS,
    THUMBS,
    JudgementsFile,
    PromptItem,
    judgement_record,
    read_prompts,
    remaining,
    thumbs_record,
)
from core.config import Config, JudgeConfig, ObjectiveConfig, SamplingConfig
from core.errors import DataError
from core.fingerprint import cache_root, combine, folder_fingerprint
from core.judges import DEFAULT_TEMPLATE, Judge, JudgeError, ModelJudge, Verdict, load_rule
from core.model_config import read_config
from core.tokenization import ChatTokenizer


def derived_seed(base: int, prompt_key: str, attempt: int, answer: int) -> int:
    """A per-answer seed: the same prompt, attempt and answer always sample the same text."""
    return int(combine("duet-sample-v1", str(base), prompt_key, str(attempt), str(answer))[:8], 16) & 0x7FFFFFFF


def model_context(location: str) -> int | None:
    """The model's context length from its config.json (None when it does not say)."""
    try:
        _, config = read_config(location)
    except Exception:
        return None
    text_config = config.get("text_config", config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(text_config.get(key), int):
            return int(text_config[key])
    return None


@dataclass
class Answers:
    """k sampled answers to one prompt, as they stream in and once done."""

    prompt: PromptItem
    index: int  # the prompt's position in its source
    attempt: int
    seeds: list[int]
    temperatures: list[float]
    texts: list[str]
    token_ids: list[list[int]]
    done: bool = False
    error: str | None = None
    seconds: float = 0.0
    left: str = "a"  # which answer the screen shows on the left (randomized: position bias)


class AnswerSampler:
    """Samples answers from a loaded backend with the ``sampling`` settings; ``adapter`` chooses the policy
    (on) or the reference model (off)."""

    def __init__(self, backend: Any, chat: ChatTokenizer, sampling: SamplingConfig, *, adapter: bool = True) -> None:
        self.backend, self.chat, self.sampling, self.adapter = backend, chat, sampling, adapter
        self.context = model_context(getattr(backend, "model_location", ""))
        self._lock = threading.Lock()  # one generation at a time on the backend
        self.provenance_extra: dict[str, Any] = {}  # what a judgements line records beside the usual fields

    def prompt_ids(self, prompt: PromptItem) -> list[int]:
        ids = self.chat.prompt_ids(prompt.conversation)
        if self.context is not None and len(ids) + self.sampling.max_new_tokens > self.context:
            raise DataError(
                f"{prompt.location}: the prompt is {len(ids)} tokens; with sampling.max_new_tokens "
                f"{self.sampling.max_new_tokens} it does not fit the model's context of {self.context} tokens. "
                "Shorten the prompt or lower sampling.max_new_tokens."
            )
        return ids

    def temperatures(self, k: int) -> list[float]:
        first = self.sampling.temperature
        second = first if self.sampling.second_temperature is None else self.sampling.second_temperature
        return [first if i % 2 == 0 else second for i in range(k)]

    def start(self, prompt: PromptItem, index: int, k: int = 2, attempt: int = 0) -> Answers:
        seeds = [derived_seed(self.sampling.seed, prompt.key, attempt, i) for i in range(k)]
        left = "a" if random.Random(seeds[0]).random() < 0.5 else "b"
        return Answers(prompt, index, attempt, seeds, self.temperatures(k), [""] * k, [[] for _ in range(k)], left=left)

    def fill(self, answers: Answers, on_update: Callable[[Answers], None] | None = None) -> Answers:
        """Generate every answer of ``answers`` in place (streaming into ``texts``)."""
        self.fill_many([answers], on_update)
        return answers

    def fill_many(
        self, batch: list[Answers], on_update: Callable[[Answers], None] | None = None, *, adapter: bool | None = None
    ) -> None:
        """Every answer of every prompt in ``batch`` sampled together, in one batch on the backend: each row
        with its own seed and temperature, so an answer is what it would be sampled alone. A prompt that
        cannot be answered (too long for the context) is marked with its error; the others go on."""
        started = time.perf_counter()
        prompts: list[list[int]] = []
        rows: list[tuple[Answers, int]] = []
        for answers in batch:
            try:
                ids = self.prompt_ids(answers.prompt)
            except DataError as exc:
                answers.error, answers.done = str(exc), True
                continue
            for slot in range(len(answers.seeds)):
                prompts.append(ids)
                rows.append((answers, slot))

        def stream(row: int, token: int) -> None:
            answers, slot = rows[row]
            answers.token_ids[slot].append(token)
            if on_update is not None:
                answers.texts[slot] = self.chat.decode(answers.token_ids[slot])
                on_update(answers)

        if rows:
            with self._lock:
                generated = self.backend.generate(
                    prompts,
                    max_new_tokens=self.sampling.max_new_tokens,
                    top_p=self.sampling.top_p,
                    top_k=self.sampling.top_k,
                    seeds=[answers.seeds[slot] for answers, slot in rows],
                    temperatures=[answers.temperatures[slot] for answers, slot in rows],
                    repetition_penalty=self.sampling.repetition_penalty,
                    adapter=self.adapter if adapter is None else adapter,
                    stop_ids=self.chat.stop_ids,
                    pad_id=self.chat.pad_id,
                    stream=stream,
                )
            for (answers, slot), tokens in zip(rows, generated, strict=True):
                answers.token_ids[slot] = tokens
                answers.texts[slot] = self.chat.decode(tokens)
        for answers in batch:
            if answers.error is None:
                answers.done, answers.seconds = True, time.perf_counter() - started
                faults.reach("collect.generate")  # killed with answers generated but not yet judged
            if on_update is not None:
                on_update(answers)

    def sample(self, prompt: PromptItem, index: int = 0, k: int = 2, attempt: int = 0) -> Answers:
        answers = self.fill(self.start(prompt, index, k, attempt))
        if answers.error:
            raise DataError(answers.error)
        return answers

    def complete(self, questions: list[str], max_new_tokens: int) -> list[str]:
        """Greedy replies to user messages (a model judge's questions)."""
        ids = [self.chat.prompt_ids([{"role": "user", "content": q}]) for q in questions]
        with self._lock:
            generated = self.backend.generate(
                ids,
                max_new_tokens=max_new_tokens,
                adapter=self.adapter,
                stop_ids=self.chat.stop_ids,
                pad_id=self.chat.pad_id,
            )
        return [self.chat.decode(g) for g in generated]


def provenance(config: Config, backend: Any, answers: Answers, *, adapter: bool) -> dict[str, Any]:
    """What a judgement file line records about where its answers came from."""
    cache = cache_root(config.train.cache_dir)
    location = getattr(backend, "model_location", "")
    adapter_path = config.model.adapter if adapter else None
    return {
        "model": config.model.path,
        "model_fingerprint": _fingerprint(location, cache),
        "adapter": adapter_path,
        "adapter_fingerprint": _fingerprint(adapter_path, cache) if adapter_path else None,
        "sampling": dataclasses.asdict(config.sampling),
        "generation_dtype": getattr(backend, "generation_dtype", None),  # what sampling.precision resolved to
        "seeds": answers.seeds,
        "temperatures": answers.temperatures,
        "attempt": answers.attempt,
        "left": answers.left,
    }


_FINGERPRINTS: dict[str, str] = {}


def weights_fingerprint(location: str | Path | None, cache: Path) -> str | None:
    """The hash of a model or adapter folder's files (None: not a folder), hashed once per process: what a
    judgement line and the evaluation's answer cache say the answers came from."""
    if not location or not Path(location).is_dir():
        return None
    key = str(location)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = folder_fingerprint(key, cache)
    return _FINGERPRINTS[key]


def _fingerprint(location: str | None, cache: Path) -> str | None:
    found = weights_fingerprint(location, cache)
    return None if found is None else found[:16]


# ---------------------------------------------------------------------------------------------------------
# Judges from the config


def build_judge(config: JudgeConfig, load_model: Callable[[str], AnswerSampler] | None = None) -> Judge:
    """The rule or model judge the config names (``load_model(path)`` gives a sampler over a loaded model)."""
    if config.kind == "rule":
        assert config.rule is not None
        return load_rule(config.rule)
    if config.kind == "model":
        assert config.model is not None and load_model is not None
        template = DEFAULT_TEMPLATE
        if config.template:
            path = Path(config.template)
            if not path.is_file():
                raise JudgeError(f"{config.template}: no such file (judge.template: a text file with the question).")
            template = path.read_text(encoding="utf-8")
        try:
            sampler = load_model(config.model)
        except JudgeError:
            raise
        except Exception as exc:
            raise JudgeError(f"judge.model {config.model}: the judge model could not be loaded: {exc}") from exc
        return ModelJudge(
            lambda questions: sampler.complete(questions, config.max_new_tokens),
            config.model,
            template,
        )
    raise JudgeError("judge.kind is human: a person judges in the Collect screen (duet collect).")


def judge_answers(judge: Judge, prompt: PromptItem, texts: list[str]) -> tuple[int, int, Verdict] | None:
    """(best, worst, verdict) among k answers; None when the judge sees no difference (a tie). Two answers:
    one verdict. More: a round robin, each answer's wins counted; ties in the count go to the earlier answer."""
    if len(texts) == 2:
        verdict = judge.judge(prompt.text, texts[0], texts[1])
        return None if verdict.winner == "tie" else ((0, 1, verdict) if verdict.winner == "a" else (1, 0, verdict))
    wins: Counter[int] = Counter({i: 0 for i in range(len(texts))})
    last = Verdict("tie")
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            last = judge.judge(prompt.text, texts[i], texts[j])
            wins[i] += last.winner == "a"
            wins[j] += last.winner == "b"
    order = sorted(wins, key=lambda i: (-wins[i], i))
    best, worst = order[0], order[-1]
    return (
        None
        if wins[best] == wins[worst]
        else (best, worst, Verdict("a", {"wins": [wins[i] for i in range(len(texts))]}))
    )


# ---------------------------------------------------------------------------------------------------------
# A person's collection session (the Collect screen drives it)


@dataclass
class Tally:
    judged: int = 0
    ties: int = 0
    both_bad: int = 0
    skipped: int = 0
    remaining: int = 0

    def text(self) -> str:
        return (
            f"judged {self.judged} · ties {self.ties} · both bad {self.both_bad} · skipped {self.skipped} · "
            f"remaining {self.remaining}"
        )


class _Closed(Exception):
    """Raised from the token stream once the session is closed: generation ends at the next token."""


@dataclass
class CollectSession:
    """Prompts still to judge, answers generated ahead in a background thread, and the file.

    The UI calls `current()` to show the pair (it may still be streaming), then one judgement method; each
    writes a line at once. `ahead` prompts beyond the current one are generated in the background."""

    sampler: AnswerSampler
    prompts: list[PromptItem]
    file: JudgementsFile
    config: Config
    judge_name: str = "human"
    ahead: int = 4
    samples: int = 2  # answers per prompt
    on_update: Callable[[Answers], None] | None = None
    _queue: list[tuple[int, PromptItem]] = field(default_factory=list)
    _answers: dict[tuple[int, int], Answers] = field(default_factory=dict)
    _attempts: dict[int, int] = field(default_factory=dict)
    _history: list[tuple[int, PromptItem]] = field(default_factory=list)
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _worker: threading.Thread | None = None
    errors: queue.Queue = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self._queue = list(remaining(self.prompts, self.file.judged_keys()))

    # -- background generation ------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._generate_ahead, name="duet-collect", daemon=True)
            self._worker.start()
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
        self.file.close()

    def _wanted(self) -> list[tuple[int, PromptItem, int]]:
        """The pairs to generate next: the pair on screen alone when it is missing (the person is waiting
        for it); else all those missing from the window once half of it is, so that pairs are made several
        to a batch (a batch of a few pairs takes little longer than one, and a person judging every few
        seconds would outrun them made one by one)."""
        with self._lock:
            window = self._queue[: 1 + self.ahead]
            missing = [
                (i, p, self._attempts.get(i, 0))
                for i, p in window
                if (i, self._attempts.get(i, 0)) not in self._answers
            ]
        if missing and missing[0][0] == window[0][0]:
            return missing[:1]
        return missing if len(missing) >= max(1, (self.ahead + 1) // 2) else []

    def _generate_ahead(self) -> None:
        while not self._stop.is_set():
            wanted = self._wanted()
            if not wanted:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            # the pair on screen and the next ones, in one batch: the person's current pair streams in
            # while the following pairs are made alongside it, at little more than the cost of one
            batch = [
                self.sampler.start(prompt, index, k=self.samples, attempt=attempt) for index, prompt, attempt in wanted
            ]
            with self._lock:
                for answers in batch:
                    self._answers[(answers.index, answers.attempt)] = answers
            try:
                self.sampler.fill_many(batch, self._updated)
            except _Closed:
                return
            except Exception as exc:  # a backend failure: shown on the pairs, not fatal
                self.errors.put(exc)
                for answers in batch:
                    answers.error, answers.done = answers.error or str(exc), True
                    if not self._stop.is_set():
                        self._updated(answers)

    def _updated(self, answers: Answers) -> None:
        if self._stop.is_set():  # closed: stop at this token, so close() never waits out a long answer
            raise _Closed
        if self.on_update is not None:
            self.on_update(answers)

    # -- what the screen shows -----------------------------------------------------------------------

    def current(self) -> Answers | None:
        """The pair to judge now (possibly still generating); None when every prompt is judged."""
        with self._lock:
            if not self._queue:
                return None
            index, prompt = self._queue[0]
            attempt = self._attempts.get(index, 0)
            found = self._answers.get((index, attempt))
        if found is None:
            self._wake.set()
            return self.sampler.start(prompt, index, k=self.samples, attempt=attempt)  # a placeholder: nothing yet
        return found

    def tally(self) -> Tally:
        counts = self.file.counts()
        return Tally(
            judged=counts["a"] + counts["b"],
            ties=counts["tie"],
            both_bad=counts["both_bad"],
            skipped=counts["skip"],
            remaining=len(self._queue),
        )

    # -- judgements ----------------------------------------------------------------------------------

    def judge(self, verdict: str, edited: str | None = None) -> dict[str, Any] | None:
        """Record a verdict on the current pair: "a"/"b" (the side preferred, as generated, not as shown),
        "tie", "both_bad" or "skip"; ``edited`` replaces the preferred answer's text. Returns the record
        written (None: the pair is still generating, or nothing is left)."""
        answers = self.current()
        if answers is None or (not answers.done and verdict != "skip"):
            return None
        if answers.error and verdict != "skip":
            return None
        texts = (answers.texts[0], answers.texts[1]) if verdict != "skip" else ("", "")
        if verdict in ("a", "b") and edited is None and texts[0] == texts[1]:
            verdict = "tie"  # identical answers teach nothing; recorded as the tie they are
        record = judgement_record(
            answers.prompt,
            texts,
            verdict,
            judge=self.judge_name,
            edited=edited,
            provenance=self._provenance(answers),
        )
        self._record(answers, record)
        return record

    def _provenance(self, answers: Answers) -> dict[str, Any]:
        return {
            **provenance(self.config, self.sampler.backend, answers, adapter=self.sampler.adapter),
            **self.sampler.provenance_extra,
        }

    def _record(self, answers: Answers, record: dict[str, Any]) -> None:
        """Write the current prompt's line and move on to the next prompt."""
        self.file.append(record)
        with self._lock:
            self._history.append(self._queue.pop(0))
            self._answers.pop((answers.index, answers.attempt), None)
        self._wake.set()

    def add_prompt(self, text: str) -> PromptItem | None:
        """A prompt typed in the screen: judged next, after the current one."""
        from core.collect import user_prompt

        if not text.strip():
            return None
        prompt = user_prompt(text.strip(), f"typed:{len(self.prompts) + 1}")
        with self._lock:
            self.prompts.append(prompt)
            self._queue.insert(min(1, len(self._queue)), (len(self.prompts) - 1, prompt))
        self._wake.set()
        return prompt

    def regenerate(self) -> None:
        """New answers for the current prompt (the next attempt's seeds)."""
        with self._lock:
            if not self._queue:
                return
            index = self._queue[0][0]
            self._attempts[index] = self._attempts.get(index, 0) + 1
        self._wake.set()

    def undo(self) -> dict[str, Any] | None:
        """Remove the last judgement from the file and show its prompt again."""
        record = self.file.undo()
        if record is None:
            return None
        with self._lock:
            if self._history:
                entry = self._history.pop()
            else:  # judged in an earlier session: find its prompt
                key = record["duet"].get("prompt_key")
                entry = next(((i, p) for i, p in enumerate(self.prompts) if p.key == key), None)
            if entry is not None:
                self._queue.insert(0, entry)
                self._attempts[entry[0]] = self._attempts.get(entry[0], 0) + 1
        self._wake.set()
        return record


@dataclass
class ThumbsTally:
    up: int = 0
    down: int = 0
    skipped: int = 0
    remaining: int = 0

    @property
    def judged(self) -> int:
        return self.up + self.down

    def text(self) -> str:
        return f"up {self.up} · down {self.down} · skipped {self.skipped} · remaining {self.remaining}"


@dataclass
class ThumbsSession(CollectSession):
    """One answer per prompt, rated thumbs up or down (or skipped): unpaired feedback, for KTO. The queue,
    the answers generated ahead, regenerate, undo and typed prompts are the pair session's."""

    samples: int = 1

    def tally(self) -> ThumbsTally:  # type: ignore[override]
        counts = self.file.counts()
        return ThumbsTally(counts["up"], counts["down"], counts["skip"], remaining=len(self._queue))

    def judge(self, verdict: str, edited: str | None = None) -> dict[str, Any] | None:
        """Rate the current answer: "up", "down" or "skip"; ``edited`` (with "up") replaces its text. Returns
        the record written (None: the answer is still generating, or nothing is left)."""
        answers = self.current()
        if answers is None or (verdict != "skip" and (not answers.done or answers.error)):
            return None
        record = thumbs_record(
            answers.prompt,
            answers.texts[0] if verdict != "skip" else "",
            verdict,
            judge=self.judge_name,
            edited=edited,
            provenance=self._provenance(answers),
        )
        self._record(answers, record)
        return record

    def _provenance(self, answers: Answers) -> dict[str, Any]:
        details = super()._provenance(answers)
        details.pop("left", None)  # one answer: no sides to shuffle
        return details


def open_prompts(source: str | None, typed: list[str] | None = None) -> list[PromptItem]:
    from core.collect import user_prompt

    prompts = read_prompts(source) if source else []
    prompts += [user_prompt(text, f"typed:{n}") for n, text in enumerate(typed or [], start=1) if text.strip()]
    if not prompts:
        raise DataError("no prompts: give a prompts file (one per line, or JSON lines with a 'prompt').")
    return prompts


def collect_with_judge(
    sampler: AnswerSampler,
    prompts: list[PromptItem],
    file: JudgementsFile,
    judge: Judge,
    config: Config,
    *,
    samples: int = 2,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    batch_prompts: int = 8,
) -> Counter[str]:
    """Sample and judge every prompt not yet in ``file`` (at most ``limit``), one line each, the answers of
    ``batch_prompts`` prompts sampled in one batch; returns the verdict counts of this call."""
    todo = list(remaining(prompts, file.judged_keys()))[:limit]
    counts: Counter[str] = Counter()
    done = 0
    for start in range(0, len(todo), batch_prompts):
        chunk = [sampler.start(prompt, index, k=samples) for index, prompt in todo[start : start + batch_prompts]]
        sampler.fill_many(chunk)
        for answers in chunk:
            if answers.error:
                raise DataError(answers.error)
            _judge_and_record(answers, file, judge, config, sampler, samples, counts)
        done += len(chunk)
        if progress is not None:  # once a batch: its prompts are answered together, so ETAs count whole batches
            progress(done, len(todo))
    return counts


def _judge_and_record(
    answers: Answers,
    file: JudgementsFile,
    judge: Judge,
    config: Config,
    sampler: AnswerSampler,
    samples: int,
    counts: Counter[str],
) -> None:
    """One prompt's answers judged, and the verdict written to the file."""
    picked = judge_answers(judge, answers.prompt, answers.texts)
    best, worst = (0, 1) if picked is None else picked[:2]
    texts = (answers.texts[best], answers.texts[worst])
    # two answers keep their order (the verdict names the side); of k, the best is "a" over the worst
    if samples == 2:
        texts, verdict = (answers.texts[0], answers.texts[1]), "tie" if picked is None else "ab"[best]
    else:
        verdict = "tie" if picked is None else "a"
    if verdict != "tie" and texts[0] == texts[1]:
        verdict = "tie"
    details = provenance(config, sampler.backend, answers, adapter=sampler.adapter)
    details["picked"] = None if picked is None else [best, worst]
    if picked is not None and picked[2].detail:
        details["judge_detail"] = picked[2].detail
    file.append(judgement_record(answers.prompt, texts, verdict, judge=judge.name, provenance=details))
    counts[verdict] += 1


# ---------------------------------------------------------------------------------------------------------
# Loading a model to sample from


def load_sampler(
    config: Config, *, adapter: str | None, use_adapter: bool, emit: Callable | None = None
) -> AnswerSampler:
    """A backend with ``config.model`` (and ``adapter`` loaded, if given) and a sampler over it; the policy
    when ``use_adapter``, else the model alone."""
    from app.backends import create_backend
    from core.distributed import SINGLE
    from core.models_io import resolve_model_path

    location = resolve_model_path(config.model.path, emit)
    backend = create_backend(config, SINGLE, None)
    backend.load_model(location, trust_remote_code=config.model.trust_remote_code)
    backend.seed(config.train.seed)
    backend.attach_lora(config.lora, adapter_path=adapter)
    chat = ChatTokenizer(backend.tokenizer, config.data.chat_template)
    return AnswerSampler(backend, chat, config.sampling, adapter=use_adapter and adapter is not None)


def judge_model_loader(config: Config) -> Callable[[str], AnswerSampler]:
    """How a model judge is loaded: the run's backend settings, the judge's own model, no adapter."""

    def load(path: str) -> AnswerSampler:
        judge_config = dataclasses.replace(config, model=dataclasses.replace(config.model, path=path, adapter=None))
        return load_sampler(judge_config, adapter=None, use_adapter=False)

    return load


def open_session(
    config: Config,
    prompts: str | None,
    out: str | Path,
    *,
    typed: list[str] | None = None,
    on_update: Callable[[Answers], None] | None = None,
    ahead: int = 4,
    thumbs: bool = False,
) -> CollectSession:
    """A person's collection session: the prompts (a file and/or typed), the model of ``config.model`` with
    ``config.model.adapter`` on when set, answers generated ahead, judgements appended to ``out`` (reopened:
    it resumes at the next unjudged prompt). ``thumbs``: one answer per prompt, rated up or down, into a
    thumbs file. Loads the model: call it off the UI thread."""
    items = open_prompts(prompts, typed)
    file = JudgementsFile(out, mode=THUMBS if thumbs else PAIRS)  # before the model: a wrong file fails fast
    try:
        sampler = load_sampler(config, adapter=config.model.adapter, use_adapter=True)
        # every judgement records the model's and adapter's fingerprints; the first hashes their weights:
        # here (off the UI thread, while the model loads), not at the person's first key press
        cache = cache_root(config.train.cache_dir)
        _fingerprint(getattr(sampler.backend, "model_location", ""), cache)
        if config.model.adapter:
            _fingerprint(config.model.adapter, cache)
    except BaseException:
        file.close()
        raise
    kind = ThumbsSession if thumbs else CollectSession
    return kind(sampler, items, file, config, ahead=ahead, on_update=on_update)


def train_config_for(
    config: Config, judgements: str | Path, output_dir: str | None = None, objective: str | None = None
) -> Config:
    """The run config that trains on a judgements file, from the adapter the answers came from ("train on
    these"): data.train is the file, no held-out split (its pairs are few and precious). ``objective``: train
    with this one instead (thumbs-up/down ratings: kto, with no NLL term)."""
    data = dataclasses.replace(config.data, train=str(Path(judgements).resolve()), eval=None, eval_fraction=0.0)
    train = dataclasses.replace(config.train, output_dir=output_dir or config.train.output_dir)
    chosen = config.objective
    if objective is not None and objective != chosen.name:
        chosen = dataclasses.replace(
            ObjectiveConfig(),
            name=objective,
            desirable_weight=chosen.desirable_weight,
            undesirable_weight=chosen.undesirable_weight,
        )
        chosen.validate()
    return dataclasses.replace(config, data=data, train=train, objective=chosen)
