"""Collecting preferences: prompt sources, the judgements file (durability, undo, resume, training on it),
the rule and model judges, and sampling answers from the demo model (seeds, streaming, both backends)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from app.collect import (
    AnswerSampler,
    build_judge,
    collect_with_judge,
    derived_seed,
    judge_answers,
    judge_model_loader,
    load_sampler,
)
from app.settings import resolve_config
from core.collect import JudgementsFile, judgement_record, read_prompts, remaining, user_prompt
from core.config import JudgeConfig
from core.data.load import load_preferences
from core.errors import DataError
from core.judges import JudgeError, ModelJudge, load_rule, parse_letter
from tests.helpers import DEMO_MODEL, write_demo_subset

CONCISE_RULE = """
def prefer(prompt, a, b):
    short_a, short_b = 0 < len(a.split()) <= 4, 0 < len(b.split()) <= 4
    if short_a != short_b:
        return "a" if short_a else "b"
    return "tie"
"""


# ---------------------------------------------------------------------------------------------------------
# Prompt sources


def test_prompts_from_text_json_lines_and_preference_files(tmp_path: Path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("# my prompts\nName a tree.\n\n  Name a river.  \n")
    prompts = read_prompts(text)
    assert [p.text for p in prompts] == ["Name a tree.", "Name a river."]
    assert prompts[1].location == f"{text}:4"

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "Hi?"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "Q2"}], "system": "Be brief."})
        + "\n"
    )
    loaded = read_prompts(rows)
    assert [p.conversation for p in loaded] == [
        [{"role": "user", "content": "Hi?"}],
        [{"role": "user", "content": "Q"}],  # the conversation's reply is not part of the prompt
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q2"}],
    ]
    pairs = read_prompts(write_demo_subset(tmp_path / "prefs.jsonl", count=5))
    assert len(pairs) == 5 and all(p.text for p in pairs)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.txt", "", "no prompts in it"),
        ("comments.txt", "# nothing\n\n", "no prompts in it"),
        ("rows.jsonl", '{"prompt": "ok"}\n{"question": "x"}\n', r"rows.jsonl:2: no 'prompt' field"),
        ("blank.jsonl", '{"prompt": "  "}\n', r"blank.jsonl:1: the prompt is empty"),
        ("broken.jsonl", '{"prompt": "ok"}\n{"prompt": \n', r"broken.jsonl:2"),
    ],
)
def test_bad_prompt_files_name_the_file_and_line(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        read_prompts(path)


def test_a_missing_prompt_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_prompts(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------------------
# The judgements file


def _record(text: str, verdict: str, answers=("Oak.", "Well, let me think about trees for a while."), **kw):
    return judgement_record(user_prompt(text, "p.txt:1"), answers, verdict, judge="human", provenance={}, **kw)


def test_judgements_train_as_they_are_and_ties_are_left_out(tmp_path: Path) -> None:
    path = tmp_path / "judged.jsonl"
    with JudgementsFile(path) as file:
        file.append(_record("Name a tree.", "a"))
        file.append(_record("Name a fish.", "tie", answers=("Cod.", "Carp.")))
        file.append(_record("Name a bird.", "b", answers=("Well, birds...", "Wren."), edited="A wren."))
        file.append(_record("Name a city.", "both_bad", answers=("x", "y")))
        file.append(_record("Name a star.", "skip"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Oak."}]
    assert rows[0]["rejected"][0]["content"].startswith("Well")
    assert rows[2]["chosen"][0]["content"] == "A wren." and rows[2]["rejected"][0]["content"] == "Well, birds..."
    assert rows[2]["duet"]["edited"] is True and rows[2]["duet"]["answers"] == {"a": "Well, birds...", "b": "Wren."}
    assert "chosen" not in rows[1] and rows[1]["duet"]["answers"] == {"a": "Cod.", "b": "Carp."}
    assert rows[4]["duet"]["answers"] is None

    pairs, report = load_preferences(path)
    assert [p.chosen for p in pairs] == ["Oak.", "A wren."]
    assert report.unpreferred_judgements == 3
    assert "3 collected ties/both-bad/skips left out" in "\n".join(report.summary_lines())


def test_a_file_of_ties_only_says_there_is_nothing_to_train_on(tmp_path: Path) -> None:
    path = tmp_path / "ties.jsonl"
    with JudgementsFile(path) as file:
        file.append(_record("Name a fish.", "tie", answers=("Cod.", "Carp.")))
    with pytest.raises(DataError, match="all ties"):
        load_preferences(path)


def test_undo_and_a_line_cut_short_by_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "judged.jsonl"
    with JudgementsFile(path) as file:
        file.append(_record("one", "a"))
        file.append(_record("two", "b"))
        assert file.undo()["duet"]["verdict"] == "b"
        assert len(path.read_text().splitlines()) == 1
        file.append(_record("three", "tie"))
    whole = path.read_bytes()
    path.write_bytes(whole + whole[: len(whole) // 3])  # a kill in the middle of writing a line
    with JudgementsFile(path) as file:
        assert file.dropped_tail and [r["prompt"][0]["content"] for r in file.records] == ["one", "three"]
        assert file.undo()["duet"]["verdict"] == "tie"
        assert file.undo()["duet"]["verdict"] == "a"
        assert file.undo() is None
    assert path.read_bytes() == b""


def test_a_file_duet_did_not_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.jsonl"
    path.write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"other.jsonl:1: record 1 is not a Duet judgement"):
        JudgementsFile(path)


def test_remaining_skips_what_was_judged_and_asks_repeats_again() -> None:
    prompts = [user_prompt(t, f"p:{i}") for i, t in enumerate(["a", "b", "a", "c"])]
    done = Counter({prompts[0].key: 1, prompts[1].key: 1})
    assert [i for i, _ in remaining(prompts, done)] == [2, 3]


# ---------------------------------------------------------------------------------------------------------
# Judges


def test_rule_judges_prefer_and_score(tmp_path: Path) -> None:
    rules = tmp_path / "rules.py"
    rules.write_text(CONCISE_RULE + "\ndef score(prompt, answer):\n    return -len(answer)\n")
    prefer = load_rule(str(rules))
    assert prefer.kind == "prefer" and prefer.judge("q", "Oak.", "Well, oak is a nice tree").winner == "a"
    assert prefer.judge("q", "Oak.", "Elm.").winner == "tie" and prefer.stats.ties == 1
    score = load_rule(f"{rules}:score")
    verdict = score.judge("q", "long answer", "short")
    assert verdict.winner == "b" and verdict.detail == {"score_a": -11.0, "score_b": -5.0}


@pytest.mark.parametrize(
    ("source", "spec", "expected"),
    [
        ("def prefer(p, a, b):\n    return 'left'\n", "", r"rules.py:prefer returned 'left' .* must return"),
        ("def score(p, a):\n    return float('nan')\n", "", r"rules.py:score returned nan .* finite number"),
        ("def score(p, a):\n    return 'high'\n", "", r"score returned 'high'"),
        ("def prefer(p, a, b):\n    return 1 / 0\n", "", r"rules.py:prefer raised ZeroDivisionError"),
        ("def judge(p, a, b):\n    return 'a'\n", "", r"rules.py: it has no a prefer\(prompt, a, b\) or score"),
        ("def prefer(p, a, b):\n    return 'a'\n", ":other", r"it has no a function other\(\)"),
        ("def prefer(a):\n    return 'a'\n", "", r"rules.py:prefer takes 1 arguments"),
        ("raise RuntimeError('boom')\n", "", r"rules.py: loading it raised RuntimeError: boom"),
    ],
)
def test_rules_that_raise_or_answer_nonsense_are_named(tmp_path: Path, source: str, spec: str, expected: str) -> None:
    rules = tmp_path / "rules.py"
    rules.write_text(source)
    with pytest.raises(JudgeError, match=expected):
        judge = load_rule(f"{rules}{spec}")
        judge.judge("Name a tree.", "Oak.", "Elm, or maybe oak.")


def test_a_missing_rule_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(JudgeError, match=r"nope.py: no such Python file"):
        load_rule(str(tmp_path / "nope.py"))


def test_the_model_judge_asks_both_orders_and_counts_what_it_could_not_decide() -> None:
    asked: list[str] = []
    # per pair: (answer to a-then-b, answer to b-then-a)
    script = iter(["A", "B", "A", "A", "I cannot tell", "B", "Answer: B.", "[[A]]"])

    def complete(questions: list[str]) -> list[str]:
        asked.extend(questions)
        return [next(script) for _ in questions]

    judge = ModelJudge(complete, "tiny")
    verdicts = judge.judge_many([("q1", "x1", "y1"), ("q2", "x2", "y2"), ("q3", "x3", "y3"), ("q4", "x4", "y4")])
    # pair 1: A then B (b shown first loses) → a; pair 2: A and A → inconsistent; pair 3: no letter; pair 4: b
    assert [v.winner for v in verdicts] == ["a", "tie", "tie", "b"]
    assert judge.stats.as_dict() == {
        "judged": 4,
        "ties": 2,
        "no_verdict": 1,
        "inconsistent": 1,
        "consistency": pytest.approx(2 / 3),
    }
    assert "Answer A:\nx1" in asked[0] and "Answer A:\ny1" in asked[1]  # the second order swaps them


def test_verdict_letters_are_read_only_when_they_stand_alone() -> None:
    assert parse_letter("B") == "b" and parse_letter("**A** is better") == "a"
    assert parse_letter("Both are fine") is None and parse_letter("") is None


def test_a_bad_judge_template_and_an_unloadable_judge_model(tmp_path: Path) -> None:
    with pytest.raises(JudgeError, match=r"has no \{b\}"):
        ModelJudge(lambda q: q, "m", "{prompt} {a}")
    config = resolve_config(None, [f"judge.model={tmp_path / 'missing'}", "judge.kind=model"])
    with pytest.raises(JudgeError, match=r"the judge model could not be loaded: .*missing"):
        build_judge(config.judge, judge_model_loader(config))


def test_best_against_worst_among_k_answers(tmp_path: Path) -> None:
    rules = tmp_path / "rules.py"
    rules.write_text("def score(prompt, answer):\n    return len(answer)\n")
    best, worst, _ = judge_answers(load_rule(str(rules)), user_prompt("q", "x"), ["bb", "a", "dddd", "ccc"])
    assert (best, worst) == (2, 1)
    assert judge_answers(load_rule(str(rules)), user_prompt("q", "x"), ["aa", "bb", "cc"]) is None


# ---------------------------------------------------------------------------------------------------------
# Sampling from the demo model


@pytest.fixture(scope="module")
def demo_sampler() -> AnswerSampler:
    config = resolve_config(
        None, [f"model.path={DEMO_MODEL}", "model.backend=torch", "model.device=cpu", "sampling.max_new_tokens=24"]
    )
    return load_sampler(config, adapter=None, use_adapter=False)


def test_answers_are_seeded_per_prompt_attempt_and_answer(demo_sampler: AnswerSampler) -> None:
    prompt = user_prompt("Name a tree.", "typed:1")
    first, again = demo_sampler.sample(prompt), demo_sampler.sample(prompt)
    assert first.texts == again.texts and first.seeds == again.seeds
    assert first.seeds == [derived_seed(0, prompt.key, 0, 0), derived_seed(0, prompt.key, 0, 1)]
    regenerated = demo_sampler.sample(prompt, attempt=1)
    assert set(regenerated.seeds).isdisjoint(first.seeds)


def test_streamed_tokens_are_the_answer(demo_sampler: AnswerSampler) -> None:
    seen: list[str] = []
    answers = demo_sampler.start(user_prompt("Name a river.", "typed:1"), 0)
    demo_sampler.fill(answers, lambda a: seen.append(a.texts[0]))
    assert answers.done and seen[-1] == answers.texts[0]
    assert len(seen) >= len(answers.token_ids[0]) + len(answers.token_ids[1])


def test_a_prompt_longer_than_the_context_is_named(demo_sampler: AnswerSampler) -> None:
    assert demo_sampler.context is not None
    long = user_prompt("tree " * demo_sampler.context, "prompts.txt:7")
    with pytest.raises(DataError, match=r"prompts.txt:7: the prompt is \d+ tokens; .* context of"):
        demo_sampler.sample(long)


def test_collecting_with_a_rule_judge_resumes_where_it_stopped(demo_sampler: AnswerSampler, tmp_path: Path) -> None:
    rules = tmp_path / "rules.py"
    rules.write_text(CONCISE_RULE)
    prompts = read_prompts(write_demo_subset(tmp_path / "prefs.jsonl", count=6))
    config = resolve_config(None, [f"model.path={DEMO_MODEL}", "sampling.max_new_tokens=24"])
    judge = load_rule(str(rules))
    with JudgementsFile(tmp_path / "a.jsonl") as whole:
        collect_with_judge(demo_sampler, prompts, whole, judge, config)
    with JudgementsFile(tmp_path / "b.jsonl") as part:
        collect_with_judge(demo_sampler, prompts, part, judge, config, limit=2)
    with JudgementsFile(tmp_path / "b.jsonl") as part:
        assert len(part.records) == 2
        reports: list[tuple[int, int]] = []
        collect_with_judge(
            demo_sampler, prompts, part, judge, config, batch_prompts=3, progress=lambda *r: reports.append(r)
        )
        # once a batch of answers, so an ETA never extrapolates from one prompt of a batch made at once
        assert reports == [(3, 4), (4, 4)]

    def strip_time(path: Path) -> list[dict]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            row["duet"].pop("time")
        return rows

    assert strip_time(tmp_path / "a.jsonl") == strip_time(tmp_path / "b.jsonl")
    rows = strip_time(tmp_path / "a.jsonl")
    assert len(rows) == 6 and {r["duet"]["judge"] for r in rows} == {f"rule:{rules}:prefer"}
    for row in rows:
        meta = row["duet"]
        assert meta["model_fingerprint"] and len(meta["seeds"]) == 2 and meta["sampling"]["max_new_tokens"] == 24
        if meta["verdict"] in ("a", "b"):
            assert row["chosen"][0]["content"] == meta["answers"][meta["verdict"]]


def test_the_tiny_model_as_a_judge_asks_both_orders(tmp_path: Path) -> None:
    """The demo model answers no judge question sensibly: every pair it cannot decide is a counted tie."""
    config = resolve_config(
        None, ["model.backend=torch", "model.device=cpu", "judge.kind=model", f"judge.model={DEMO_MODEL}"]
    )
    judge = build_judge(config.judge, judge_model_loader(config))
    assert isinstance(judge, ModelJudge)
    verdicts = judge.judge_many([("Name a tree.", "Oak.", "Well, trees..."), ("Name a fish.", "Cod.", "Hmm, fish")])
    stats = judge.stats
    assert stats.judged == 2 and stats.ties == stats.no_verdict + stats.inconsistent
    assert all(len(v.detail["outputs"]) == 2 for v in verdicts)
    assert all(v.winner == "tie" for v in verdicts if None in v.detail["orders"])


def test_mlx_samples_and_collects_with_the_tiny_model(tmp_path: Path) -> None:
    pytest.importorskip("mlx.core")
    rules = tmp_path / "rules.py"
    rules.write_text(CONCISE_RULE)
    config = resolve_config(None, [f"model.path={DEMO_MODEL}", "model.backend=mlx", "sampling.max_new_tokens=16"])
    sampler = load_sampler(config, adapter=None, use_adapter=False)
    prompts = read_prompts(write_demo_subset(tmp_path / "prefs.jsonl", count=2))
    with JudgementsFile(tmp_path / "mlx.jsonl") as file:
        counts = collect_with_judge(sampler, prompts, file, load_rule(str(rules)), config)
    assert sum(counts.values()) == 2
    again = sampler.sample(prompts[0])
    assert again.texts == sampler.sample(prompts[0]).texts  # seeded on MLX too


def test_judge_config_needs_its_target() -> None:
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"judge\.rule is not set"):
        JudgeConfig(kind="rule").validate()
