"""``duet eval``: the KL estimate through the product's own path (the backend's sampler and masked kernel)
against an exact computation on a model small enough to enumerate, its per-token form against teacher-forced
exact KL, the demo's tuned-vs-base figures (direction and rough size) with checkpoints, the answer cache on a
second run, a person's blind A/B, the CLI's errors, and a killed evaluation leaving no partial report.

Tolerances: log-probs through the kernel against a full-logits float32 forward, 1e-5 absolute (a few float32
roundings of terms of size ~2); Monte-Carlo estimates within 4 of their own standard errors (a fixed seed, so
a pass is reproducible; 4 s.e. is one chance in ~16,000 of a false failure for a correct estimator)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

from app.blind import PairedSampler, blind_file, open_blind_session
from app.cli import main as duet_main
from app.eval_answers import answer_logps
from app.evaluate import evaluate, human_figures, resolve_target
from app.run import run
from backends.torch_backend.backend import TorchBackend
from core.collect import JudgementsFile, read_prompts
from core.config import LoraConfig, SamplingConfig
from core.evaluation.report import read_report
from core.evaluation.stats import exact_token_kl, kl_from_samples
from tests.helpers import DEMO_MODEL, quick_config, tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]


def quiet() -> Console:
    return Console(file=StringIO(), width=120)


PROMPT = [1, 2]
LIMIT = 3  # new tokens at most
VOCAB = 6


# ---------------------------------------------------------------------------------------------------------
# A model small enough to enumerate every answer: vocabulary 6, at most 3 new tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TorchBackend:
    folder = tmp_path_factory.mktemp("tiny-vocab")
    model = tiny_causal_lm(vocab=VOCAB, tie=False, seed=3)
    with torch.no_grad():  # random-init logits are ~0 (a near-uniform model): make them matter
        model.lm_head.weight.mul_(60.0)
    model.save_pretrained(folder)
    for file in Path(DEMO_MODEL).iterdir():  # a tokenizer to load with; the test passes token ids directly
        if "token" in file.name or file.suffix == ".jinja":
            shutil.copy(file, folder / file.name)
    backend = TorchBackend(device="cpu", dtype="float32")
    backend.load_model(str(folder))
    backend.seed(0)
    backend.attach_lora(LoraConfig(rank=4, alpha=8))
    with torch.no_grad():  # a LoRA that moves the distribution: tuned ≠ base
        for name, parameter in backend.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return backend


def full_logprobs(backend: TorchBackend, tokens: list[int], adapter: bool) -> np.ndarray:
    """log π(· | prompt, tokens[:t]) for every t, from a plain full-vocabulary forward (float64 softmax)."""
    ids = torch.tensor([PROMPT + tokens])
    with torch.no_grad():
        if adapter:
            logits = backend.model(input_ids=ids).logits
        else:
            with backend.model.disable_adapter():
                logits = backend.model(input_ids=ids).logits
    rows = logits[0, len(PROMPT) - 1 :].double()
    return torch.log_softmax(rows, dim=-1).numpy()


def outcomes(stops: list[int]) -> list[tuple[list[int], bool]]:
    """Every way an answer can come out: ended (by any stop token) after 0..LIMIT-1 tokens, or cut at LIMIT."""
    words = [t for t in range(VOCAB) if t not in stops]
    ended = [(list(seq), True) for n in range(LIMIT) for seq in itertools.product(words, repeat=n)]
    return ended + [(list(seq), False) for seq in itertools.product(words, repeat=LIMIT)]


def exact_logp(backend: TorchBackend, tokens: list[int], finished: bool, stops: list[int], adapter: bool) -> float:
    table = full_logprobs(backend, tokens, adapter)
    total = sum(table[t, token] for t, token in enumerate(tokens))
    if finished:
        total += np.logaddexp.reduce([table[len(tokens), s] for s in stops])
    return float(total)


def score(backend: TorchBackend, answers: list[tuple[list[int], bool]], stops: list[int], adapter: bool) -> np.ndarray:
    chat = SimpleNamespace(stop_ids=stops, pad_id=0)
    return answer_logps(
        backend, chat, [PROMPT] * len(answers), [a for a, _ in answers], [f for _, f in answers], adapter=adapter
    )


def test_answer_logps_are_exact_and_every_outcome_sums_to_one(tiny) -> None:
    stops = [0, 5]  # two stop tokens: "it ends here" is one event, whichever the sampler drew
    every = outcomes(stops)
    for adapter in (True, False):
        scored = score(tiny, every, stops, adapter)
        exact = np.array([exact_logp(tiny, a, f, stops, adapter) for a, f in every])
        np.testing.assert_allclose(scored, exact, atol=1e-5, rtol=0)
        assert abs(np.logaddexp.reduce(scored)) < 1e-5  # a distribution over the outcomes: Σ p = 1


def score_drawn(
    backend: TorchBackend, drawn: list[tuple[list[int], bool]], stops: list[int], adapter: bool
) -> np.ndarray:
    """``score`` of many draws, each distinct answer scored once (there are only a few hundred)."""
    distinct = sorted({(tuple(a), f) for a, f in drawn})
    values = score(backend, [(list(a), f) for a, f in distinct], stops, adapter)
    table = dict(zip(distinct, values, strict=True))
    return np.array([table[(tuple(a), f)] for a, f in drawn])


def sample(backend: TorchBackend, count: int, stops: list[int]) -> list[tuple[list[int], bool]]:
    answers = backend.generate(
        [PROMPT] * count, max_new_tokens=LIMIT, temperature=1.0, seeds=list(range(count)), stop_ids=stops, pad_id=0
    )
    return [(a, len(a) < LIMIT) for a in answers]


def test_the_kl_estimate_matches_the_exact_kl_by_enumeration(tiny) -> None:
    stops = [0, 5]
    every = outcomes(stops)
    tuned, base = score(tiny, every, stops, True), score(tiny, every, stops, False)
    exact_kl = float(np.sum(np.exp(tuned) * (tuned - base)))
    exact_entropy = float(-np.sum(np.exp(tuned) * tuned))
    assert exact_kl > 0.05  # the LoRA moved the model enough for the check to mean something

    drawn = sample(tiny, 6000, stops)
    policy, reference = score_drawn(tiny, drawn, stops, True), score_drawn(tiny, drawn, stops, False)
    counts = [len(a) + int(f) for a, f in drawn]
    estimate = kl_from_samples(policy.tolist(), reference.tolist(), counts)
    standard_error = (estimate.high - estimate.low) / (2 * 1.959964)
    assert abs(estimate.per_answer - exact_kl) < 4 * standard_error, (estimate, exact_kl)
    assert estimate.low <= exact_kl <= estimate.high
    entropy = estimate.entropy_per_token * estimate.tokens / estimate.answers
    ratio = -policy
    assert abs(entropy - exact_entropy) < 4 * ratio.std() / np.sqrt(len(ratio))


def test_the_per_token_form_matches_teacher_forced_exact_kl(tiny) -> None:
    """With one stop token, Σ over an answer's positions of the exact next-token KL (teacher-forced on the
    sampled answer) has the sequence KL as its mean: the same quantity as the sampled log-ratio, with less
    noise. Both agree with the enumeration, and the per-token rate with Σ exact / Σ tokens."""
    stops = [0]
    every = outcomes(stops)
    tuned, base = score(tiny, every, stops, True), score(tiny, every, stops, False)
    exact_kl = float(np.sum(np.exp(tuned) * (tuned - base)))

    drawn = sample(tiny, 3000, stops)
    policy, reference = score_drawn(tiny, drawn, stops, True), score_drawn(tiny, drawn, stops, False)
    counts = [len(a) + int(f) for a, f in drawn]
    estimate = kl_from_samples(policy.tolist(), reference.tolist(), counts)
    per_answer: dict[tuple[tuple[int, ...], bool], float] = {}
    for tokens, finished in {(tuple(a), f) for a, f in drawn}:
        positions = len(tokens) + int(finished)  # the stop step is a choice the model made too
        on = full_logprobs(tiny, list(tokens), True)[:positions]
        off = full_logprobs(tiny, list(tokens), False)[:positions]
        per_answer[(tokens, finished)] = float(exact_token_kl(on, off).sum())
    forced = np.array([per_answer[(tuple(a), f)] for a, f in drawn])
    forced_se = forced.std() / np.sqrt(len(forced))
    assert abs(forced.mean() - exact_kl) < 4 * forced_se
    sampled_se = (estimate.high - estimate.low) / (2 * 1.959964)
    assert forced_se < sampled_se  # the teacher-forced form is the less noisy one
    per_token_exact = forced.sum() / sum(counts)
    assert abs(estimate.per_token - per_token_exact) < 4 * sampled_se * len(drawn) / sum(counts)


# ---------------------------------------------------------------------------------------------------------
# The demo: tuned against base with its rule judge, over checkpoints

JUDGE = ["judge.kind=rule", f"judge.rule={ROOT / 'models/demo/concise.py'}"]
UNSEEN = str(ROOT / "models/demo/unseen_prompts.txt")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval-demo")
    config = quick_config(
        folder,
        data={"train": "demo", "eval_fraction": 0.1},
        lora={"rank": 8, "alpha": 16},
        objective={"name": "dpo", "nll_weight": 1.0},
        train={"max_steps": 90, "batch_size": 8, "save_every": 30, "keep_checkpoints": 5, "log_every": 10},
    )
    config.train.schedule = "cosine"
    config.train.warmup_ratio = 0.1
    return run(config, console=quiet()).run_dir


@pytest.mark.slow
def test_the_demo_evaluation_shows_what_training_changed(demo_run: Path, capsys) -> None:
    """The rule prefers replies of 1-4 words; the demo trains toward them: the tuned model wins against the
    base, its answers are shorter, and it moved away from the base (KL) more with every checkpoint."""
    overrides = [*JUDGE, "evaluation.max_prompts=32", "evaluation.samples=2", "evaluation.kl_samples=2"]
    code = duet_main(["eval", str(demo_run), "--prompts", UNSEEN, "--checkpoints", *overrides])
    assert code == 0
    first = capsys.readouterr().out
    report = read_report(demo_run / "eval")
    assert report is not None
    judge, lc, kl = report["judge"], report["length_controlled"], report["kl"]
    assert judge["n"] == 64 and judge["rate"] > 0.55 and judge["low"] > 0.5, judge
    assert judge["wins"] > 4 * judge["losses"]
    # this rule rewards length alone: at equal length it has no preference left to give
    assert lc is not None and lc["low"] < 0.5 < lc["high"] + 0.1 and lc["slope"] < 0
    base_tokens = report["degeneration"]["base"]["mean_tokens"]
    tuned_tokens = report["degeneration"]["tuned"]["mean_tokens"]
    assert tuned_tokens < 0.75 * base_tokens
    assert kl["per_answer"] > 0.2 and kl["low"] > 0
    steps = [row["step"] for row in report["checkpoints"]]
    kls = [row["kl"]["per_answer"] for row in report["checkpoints"]]
    assert steps == [30, 60, 90]
    assert kls[0] < kls[1] < kls[2], kls  # the policy drifts further from the base as training goes on
    assert report["checkpoints"][-1]["kl"]["per_answer"] == pytest.approx(kl["per_answer"])
    files = {p.name for p in (demo_run / "eval").iterdir()}
    expected = {"eval.json", "eval.md", "answers.jsonl", "lengths.png", "win_rates.png", "checkpoints.png"}
    assert expected | {"margins.png"} <= files
    assert report["pairs"]["reward_accuracy"] > 0.8 and len(report["pairs"]["margins"]) > 10
    markdown = (demo_run / "eval" / "eval.md").read_text()
    assert f"{judge['rate']:.2f} [{judge['low']:.2f}, {judge['high']:.2f}]" in markdown
    assert "win rate" in first and "KL from the base" in first

    # a second evaluation answers nothing again: every answer comes from the cache, the figures are the same
    assert duet_main(["eval", str(demo_run), "--prompts", UNSEEN, "--checkpoints", *overrides]) == 0
    second = capsys.readouterr().out
    assert second.count("from the cache") >= 2 + 2 * 3  # base, tuned, KL samples; each checkpoint's two
    again = read_report(demo_run / "eval")
    assert again["judge"] == judge and again["kl"] == kl

    # side by side with another evaluation (a copy, another label)
    other = demo_run.parent / "other-run"
    shutil.copytree(demo_run / "eval", other / "eval")
    assert duet_main(["eval", "--compare", str(demo_run), str(other)]) == 0
    table = capsys.readouterr().out
    assert demo_run.name in table and "other-run" in table and f"{judge['rate']:.2f}" in table


@pytest.mark.slow
def test_a_killed_evaluation_leaves_the_old_report_or_none(demo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    command = [sys.executable, "-m", "app.cli", "eval", str(demo_run), "--prompts", UNSEEN, "--out", str(out)]
    command += [*JUDGE, "evaluation.max_prompts=8", "evaluation.samples=1", "evaluation.kl_samples=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for point in ("write.rename:3", "dir.rename:1"):
        killed = subprocess.run(command, env={**env, "DUET_FAULT": point}, capture_output=True, text=True, cwd=ROOT)
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert read_report(out) is None  # no report yet: none half-written either
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    complete = read_report(out)
    killed = subprocess.run(command, env={**env, "DUET_FAULT": "dir.swap:1"}, capture_output=True, text=True, cwd=ROOT)
    assert killed.returncode == -9
    assert read_report(out) == complete  # the old report, whole


@pytest.mark.slow
def test_the_mlx_backend_evaluates_the_same_run(demo_run: Path, tmp_path: Path) -> None:
    """The torch run's adapter on MLX: its own answers (another sampler), the same direction of the figures."""
    overrides = [*JUDGE, "model.backend=mlx", "evaluation.max_prompts=12", "evaluation.kl_samples=1"]
    result = evaluate(demo_run, overrides=overrides, prompts=UNSEEN, out=tmp_path / "mlx")
    report = result.report
    assert report["settings"]["backend"] == "mlx"
    assert report["judge"]["rate"] > 0.5 and report["kl"]["per_answer"] > 0
    assert report["degeneration"]["tuned"]["mean_tokens"] < report["degeneration"]["base"]["mean_tokens"]


# ---------------------------------------------------------------------------------------------------------
# A person's blind A/B


def test_blind_ab_pairs_tuned_and_base_answers_with_one_seed(demo_run: Path) -> None:
    from app.collect import AnswerSampler, load_sampler

    target = resolve_target(demo_run)
    loaded = load_sampler(target.config, adapter=str(target.adapter), use_adapter=True)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=5)
    paired = PairedSampler(loaded.backend, loaded.chat, sampling)
    batch = [paired.start(p, i) for i, p in enumerate(read_prompts(UNSEEN)[:3])]
    paired.fill_many(batch)
    for answers in batch:
        assert answers.done and answers.seeds[0] == answers.seeds[1]
        alone = []
        for adapter in (True, False):  # each side as its model alone would sample it with that seed
            sampler = AnswerSampler(loaded.backend, loaded.chat, sampling, adapter=adapter)
            one = sampler.start(answers.prompt, answers.index)
            one.seeds, one.temperatures, one.texts, one.token_ids = [answers.seeds[0]], [1.0], [""], [[]]
            sampler.fill_many([one])
            alone.append(one.texts[0])
        assert answers.texts == alone


def test_a_persons_blind_verdicts_become_the_human_win_rate(demo_run: Path, tmp_path: Path) -> None:
    run_copy = tmp_path / "run"
    shutil.copytree(demo_run, run_copy, ignore=shutil.ignore_patterns("eval", "blind-ab.jsonl"))
    overrides = ["sampling.max_new_tokens=16", "evaluation.max_prompts=4"]
    session = open_blind_session(run_copy, overrides=overrides, prompts=UNSEEN, ahead=1)
    session.start()
    pressed, expected = ["a", "a", "b", "tie"], []
    try:
        for verdict in pressed:
            deadline = time.monotonic() + 60
            while not session.current().done:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            tuned, base = session.current().texts
            expected.append("tie" if tuned == base else verdict)  # the same answer twice is recorded as a tie
            record = session.judge(verdict)
            assert record is not None and record["duet"]["sides"] == {"a": "tuned", "b": "base"}
    finally:
        session.close()
    with JudgementsFile(blind_file(resolve_target(run_copy))) as file:
        records = list(file.records)
    assert [r["duet"]["verdict"] for r in records] == expected
    # every line names the tuned adapter, also while the next pair's base answer was generating
    assert all(r["duet"]["adapter_fingerprint"] for r in records)
    human = human_figures(run_copy, records[0]["duet"]["adapter_fingerprint"])
    score = {"a": 1.0, "b": 0.0, "tie": 0.5}
    assert human is not None and human["n"] == 4
    assert human["rate"] == pytest.approx(sum(score[v] for v in expected) / 4)
    result = evaluate(run_copy, overrides=[*overrides, *JUDGE, "evaluation.kl_samples=0"], prompts=UNSEEN)
    assert result.report["human"]["n"] == 4


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_targets_get_clear_errors(tmp_path: Path, capsys) -> None:
    assert duet_main(["eval", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "not a run folder" in err and "Traceback" not in err
    assert duet_main(["eval", "--compare", str(tmp_path)]) != 0
    assert "no evaluation report" in capsys.readouterr().err
    assert duet_main(["eval", str(tmp_path), "--judge", "oracle"]) != 0
    assert "--judge 'oracle'" in capsys.readouterr().err
    stopped = run(quick_config(tmp_path / "stopped", train={"max_steps": 2}), console=quiet()).run_dir
    shutil.rmtree(stopped / "adapter")
    assert duet_main(["eval", str(stopped)]) != 0
    assert "no final adapter" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("# only a comment\n")
    assert duet_main(["eval", str(demo_like(tmp_path)), "--prompts", str(tmp_path / "prompts.txt")]) != 0
    assert "prompts.txt" in capsys.readouterr().err


def demo_like(tmp_path: Path) -> Path:
    return run(quick_config(tmp_path / "quick", train={"max_steps": 2}), console=quiet()).run_dir


def test_eval_keys_are_in_the_config_listing() -> None:
    from core.config import config_sections

    keys = {option.key for _, _, options in config_sections() for option in options}
    assert {"evaluation.at_end", "evaluation.samples", "evaluation.kl_samples", "evaluation.prompts"} <= keys
    json.dumps([o.default for _, _, options in config_sections() for o in options])
