"""Judges that say which of two answers to a prompt is better, for when no person is at the keyboard.

- ``rule``: a function in the user's own Python file, loaded only because the config names it:
  ``prefer(prompt, a, b) -> "a" | "b" | "tie"`` or ``score(prompt, answer) -> float`` (higher is better).
- ``model``: a local model asked a pairwise question. Each pair is asked in both orders; the verdict stands
  only when both orders agree, otherwise (or when an answer names no letter) it is a tie, and counted.

A judge returns a `Verdict`; how often it abstained or disagreed with itself is in its `JudgeStats`.
The model judge is given a ``complete`` function (prompts in, texts out) by the application layer, so this
module loads no model itself.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.errors import DuetError


class JudgeError(DuetError):
    """A judge that cannot be loaded, or that answered something that is no verdict."""


@dataclass(frozen=True)
class Verdict:
    winner: str  # "a", "b" or "tie"
    detail: dict[str, Any] = field(default_factory=dict)  # scores, raw judge outputs, consistency


@dataclass
class JudgeStats:
    judged: int = 0
    ties: int = 0
    no_verdict: int = 0  # a model judge's answer named neither letter (counted as a tie)
    inconsistent: int = 0  # the two orders disagreed (counted as a tie)
    both_orders: bool = False  # a judge that is asked each pair twice (a model), so consistency means something

    @property
    def consistency(self) -> float | None:
        """Share of pairs whose two orders agreed, among those where both orders gave a verdict."""
        both = self.judged - self.no_verdict
        return None if both <= 0 or not self.both_orders else 1.0 - self.inconsistent / both

    def as_dict(self) -> dict[str, Any]:
        return {
            "judged": self.judged,
            "ties": self.ties,
            "no_verdict": self.no_verdict,
            "inconsistent": self.inconsistent,
            "consistency": self.consistency,
        }


class Judge(Protocol):
    name: str
    stats: JudgeStats

    def judge(self, prompt: str, a: str, b: str) -> Verdict: ...


# ---------------------------------------------------------------------------------------------------------
# Rule judges


class RuleJudge:
    """A user's ``prefer`` or ``score`` function."""

    def __init__(self, function: Callable[..., Any], kind: str, where: str) -> None:
        self.function, self.kind, self.where = function, kind, where
        self.name = f"rule:{where}"
        self.stats = JudgeStats()

    def judge(self, prompt: str, a: str, b: str) -> Verdict:
        if self.kind == "prefer":
            raw = self._call(prompt, a, b)
            winner = str(raw).strip().lower() if isinstance(raw, str) else None
            if winner not in ("a", "b", "tie"):
                raise JudgeError(
                    f"{self.where} returned {raw!r} for the prompt {_quote(prompt)}; prefer() must return "
                    '"a", "b" or "tie".'
                )
            verdict = Verdict(winner)
        else:
            score_a, score_b = self.score(prompt, a), self.score(prompt, b)
            winner = "a" if score_a > score_b else "b" if score_b > score_a else "tie"
            verdict = Verdict(winner, {"score_a": score_a, "score_b": score_b})
        self.stats.judged += 1
        self.stats.ties += verdict.winner == "tie"
        return verdict

    def score(self, prompt: str, answer: str) -> float:
        """The rule's score of one answer (score rules only)."""
        raw = self._call(prompt, answer)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            raise JudgeError(
                f"{self.where} returned {raw!r} for the prompt {_quote(prompt)}; score() must return a finite number."
            )
        return float(raw)

    def _call(self, *args: str) -> Any:
        try:
            return self.function(*args)
        except Exception as exc:
            raise JudgeError(
                f"{self.where} raised {type(exc).__name__}: {exc} (on the prompt {_quote(args[0])}); fix the rule "
                "and run again: what was judged before is kept."
            ) from exc


def load_rule(spec: str) -> RuleJudge:
    """``path/to/file.py`` (its ``prefer``, else its ``score``) or ``path/to/file.py:function``."""
    file_text, _, name = spec.rpartition(":") if ".py:" in spec else (spec, "", "")
    path = Path(file_text).expanduser()
    if path.suffix != ".py" or not path.is_file():
        raise JudgeError(
            f"{file_text}: no such Python file; judge.rule names a .py file with a prefer(prompt, a, b) or "
            "score(prompt, answer) function, as path/to/rules.py or path/to/rules.py:function."
        )
    module_name = f"duet_rule_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        raise JudgeError(f"{path}: loading it raised {type(exc).__name__}: {exc}") from exc
    sys.modules[module_name] = module
    names = [name] if name else ["prefer", "score"]
    for candidate in names:
        function = getattr(module, candidate, None)
        if callable(function):
            kind = _rule_kind(function, candidate, path)
            return RuleJudge(function, kind, f"{path}:{candidate}")
    wanted = f"a function {name}()" if name else "a prefer(prompt, a, b) or score(prompt, answer) function"
    raise JudgeError(f"{path}: it has no {wanted}.")


def _rule_kind(function: Callable[..., Any], name: str, path: Path) -> str:
    """prefer (three arguments) or score (two), from the signature."""
    try:
        parameters = [
            p
            for p in inspect.signature(function).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        return "prefer" if name == "prefer" else "score"
    if len(parameters) == 3:
        return "prefer"
    if len(parameters) == 2:
        return "score"
    raise JudgeError(
        f"{path}:{name} takes {len(parameters)} arguments; a rule is prefer(prompt, a, b) -> 'a'|'b'|'tie' "
        "or score(prompt, answer) -> float."
    )


# ---------------------------------------------------------------------------------------------------------
# Model judges

DEFAULT_TEMPLATE = (
    "Two assistants answered the same request. Which answer is better: more helpful, correct and to the point?\n\n"
    "Request:\n{prompt}\n\n"
    "Answer A:\n{a}\n\n"
    "Answer B:\n{b}\n\n"
    'Reply with one letter: "A" if answer A is better, "B" if answer B is better.'
)
_LETTER = re.compile(r"(?<![A-Za-z])([AB])(?![A-Za-z])")


def check_template(template: str, where: str) -> str:
    for slot in ("{prompt}", "{a}", "{b}"):
        if slot not in template:
            raise JudgeError(f"{where}: the judge template has no {slot}; it needs {{prompt}}, {{a}} and {{b}}.")
    return template


def parse_letter(output: str) -> str | None:
    """The first standalone A or B in the judge's output (None: it named neither)."""
    match = _LETTER.search(output.strip())
    return match.group(1).lower() if match else None


class ModelJudge:
    """A local model asked ``template`` about (a, b) and about (b, a); ``complete`` answers a batch of
    questions (user messages) with texts, greedily."""

    def __init__(self, complete: Callable[[list[str]], list[str]], name: str, template: str = DEFAULT_TEMPLATE) -> None:
        self.complete, self.template = complete, check_template(template, name)
        self.name = f"model:{name}"
        self.stats = JudgeStats(both_orders=True)

    def _ask(self, prompt: str, first: str, second: str) -> str:
        return self.template.replace("{prompt}", prompt).replace("{a}", first).replace("{b}", second)

    def judge(self, prompt: str, a: str, b: str) -> Verdict:
        return self.judge_many([(prompt, a, b)])[0]

    def judge_many(self, items: list[tuple[str, str, str]]) -> list[Verdict]:
        """Both orders of every pair in one batch of questions."""
        questions = []
        for prompt, a, b in items:
            questions += [self._ask(prompt, a, b), self._ask(prompt, b, a)]
        outputs = self.complete(questions)
        verdicts = []
        for index in range(len(items)):
            forward, backward = outputs[2 * index], outputs[2 * index + 1]
            first, second = parse_letter(forward), parse_letter(backward)
            # the second question shows b as "A": a letter there names the other answer
            second_says = None if second is None else ("b" if second == "a" else "a")
            detail = {"outputs": [forward, backward], "orders": [first, second_says]}
            self.stats.judged += 1
            if first is None or second_says is None:
                self.stats.no_verdict += 1
                winner = "tie"
            elif first != second_says:
                self.stats.inconsistent += 1
                winner = "tie"
            else:
                winner = first
            self.stats.ties += winner == "tie"
            verdicts.append(Verdict(winner, detail))
        return verdicts


def _quote(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")
