"""MLX generation decodes its rows together (mlx-lm's BatchGenerator) and each answer is still a function of its
prompt, seed and settings alone: batched answers equal the same rows generated one by one, greedy and sampled,
token for token; they equal what the row-by-row sampler this replaced drew (``mx.random.seed`` per row, then
mlx-lm's ``make_sampler`` and ``generate_step``); and MLX greedy equals torch greedy on the same weights with the
adapter on. On the demo model a batched decoding step's logits are bit-identical to an unbatched one's, so no
exception is needed here (a larger model's batched matrix products may round differently)."""

from __future__ import annotations

from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")

import torch  # noqa: E402

from backends.mlx_backend import generation  # noqa: E402
from backends.mlx_backend.backend import MlxBackend  # noqa: E402
from backends.torch_backend.backend import TorchBackend  # noqa: E402
from core.config import LoraConfig  # noqa: E402
from core.tokenization import ChatTokenizer  # noqa: E402
from tests.helpers import DEMO_MODEL  # noqa: E402

LORA = LoraConfig(rank=4, alpha=8)
QUESTIONS = [
    "Name a tree.",
    "Can you name a river, please?",
    "Name a bird.",
    "What is your favourite fruit, friend?",
    "Tell me something about the sea and the things that live in it.",
    "Hi",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[MlxBackend, TorchBackend, ChatTokenizer]:
    """Both backends on the demo model with the same LoRA, non-trivial so that "adapter on" changes answers."""
    torch_backend = TorchBackend(device="cpu", dtype="float32")
    torch_backend.load_model(str(DEMO_MODEL))
    torch_backend.seed(0)
    torch_backend.attach_lora(LORA)
    with torch.no_grad():
        for name, parameter in torch_backend.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    folder = tmp_path_factory.mktemp("adapter")
    torch_backend.save_adapter(folder)
    mlx_backend = MlxBackend(dtype="float32")
    mlx_backend.load_model(str(DEMO_MODEL))
    mlx_backend.seed(0)
    mlx_backend.attach_lora(LORA)
    mlx_backend.load_adapter(Path(folder))
    return mlx_backend, torch_backend, ChatTokenizer(torch_backend.tokenizer)


def _prompts(chat: ChatTokenizer) -> list[list[int]]:
    prompts = [chat.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 2  # left padding is exercised
    return prompts


def _alone(backend: MlxBackend, prompts: list[list[int]], seeds: list[int], **settings) -> list[list[int]]:
    return [backend.generate([p], seeds=[s], **settings)[0] for p, s in zip(prompts, seeds, strict=True)]


@pytest.mark.parametrize(("adapter", "penalty"), [(True, 1.0), (False, 1.0), (True, 3.0)])
def test_batched_greedy_answers_equal_unbatched(demo, adapter: bool, penalty: float) -> None:
    backend, _, chat = demo
    prompts = _prompts(chat)
    settings = {"max_new_tokens": 24, "stop_ids": chat.stop_ids, "adapter": adapter, "repetition_penalty": penalty}
    batched = backend.generate(prompts, **settings)
    assert batched == [backend.generate([p], **settings)[0] for p in prompts]


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0},
        {"temperature": 1.5, "top_p": 0.9},
        {"temperature": 0.8, "top_k": 20, "repetition_penalty": 1.3},
        {"temperature": 1.5, "stop_ids": []},  # every row runs to max_new_tokens: a long batched decode
    ],
)
def test_a_sampled_row_is_the_same_alone_or_in_a_batch(demo, sampling: dict) -> None:
    backend, _, chat = demo
    prompts = _prompts(chat)
    seeds = [11, 12, 13, 14, 15, 16]
    settings = {"max_new_tokens": 32, "stop_ids": chat.stop_ids, **sampling}
    batched = backend.generate(prompts, seeds=seeds, **settings)
    assert batched == _alone(backend, prompts, seeds, **settings)
    assert backend.generate(prompts, seeds=seeds, **settings) == batched  # and again
    assert backend.generate(prompts[::-1], seeds=seeds[::-1], **settings) == batched[::-1]
    if settings["stop_ids"]:  # rows left the batch at different steps
        assert len({len(answer) for answer in batched}) > 1


def test_rows_sharing_a_prompt_differ_by_seed_and_mix_with_greedy_rows(demo) -> None:
    backend, _, chat = demo
    prompt = _prompts(chat)[4]
    settings = {"max_new_tokens": 24, "stop_ids": [], "temperature": 1.5}
    pair = backend.generate([prompt, prompt, prompt], seeds=[1, 2, 1], temperatures=[1.5, 1.5, 0.0], **settings)
    assert pair[0] == _alone(backend, [prompt], [1], **settings)[0]
    assert pair[1] == _alone(backend, [prompt], [2], **settings)[0]
    assert pair[0] != pair[1]  # one prefill, two answers of their own
    assert pair[2] == backend.generate([prompt], max_new_tokens=24, stop_ids=[])[0]  # greedy in a sampled batch


def _row_by_row(backend: MlxBackend, prompts, seeds, *, temperature, top_p, top_k, penalty, stop_ids, max_new_tokens):
    """What MLX generation did before it batched: one row at a time, MLX's global generator seeded per row."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    replies = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        mx.random.seed(seed)
        sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0, top_k=top_k)
        processors = [generation.repetition_penalty(penalty)] if penalty != 1.0 else None
        tokens: list[int] = []
        steps = generate_step(
            mx.array(prompt), backend.model, max_tokens=max_new_tokens, sampler=sampler, logits_processors=processors
        )
        for token, _ in steps:
            if int(token) in stop_ids:
                break
            tokens.append(int(token))
        replies.append(tokens)
    return replies


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k", "penalty"), [(0.0, 1.0, 0, 1.0), (1.0, 1.0, 0, 1.0), (0.8, 0.95, 20, 1.3)]
)
def test_answers_equal_the_row_by_row_sampler_they_replaced(demo, temperature, top_p, top_k, penalty) -> None:
    backend, _, chat = demo
    prompts, seeds = _prompts(chat), [100, 101, 102, 103, 104, 105]
    settings = {"max_new_tokens": 32, "stop_ids": chat.stop_ids}
    ours = backend.generate(
        prompts, seeds=seeds, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=penalty, **settings
    )
    with backend._adapter(True):
        before = _row_by_row(
            backend, prompts, seeds, temperature=temperature, top_p=top_p, top_k=top_k, penalty=penalty, **settings
        )
    assert ours == before


def test_streamed_tokens_arrive_in_order_and_stop_tokens_stay_out(demo) -> None:
    backend, _, chat = demo
    seen: list[tuple[int, int]] = []
    prompts = _prompts(chat)[:3]
    out = backend.generate(
        prompts,
        max_new_tokens=10,
        temperature=1.0,
        seeds=[5, 6, 7],
        stop_ids=chat.stop_ids,
        stream=lambda row, token: seen.append((row, token)),
    )
    assert [[t for r, t in seen if r == row] for row in range(3)] == out
    assert all(len(a) <= 10 and not set(a) & set(chat.stop_ids) for a in out)
    assert backend.generate(prompts, max_new_tokens=0, stop_ids=chat.stop_ids) == [[], [], []]
    assert backend.generate([], max_new_tokens=5) == []


def test_the_one_by_one_path_gives_the_same_answers(demo, monkeypatch) -> None:
    """A model or mlx-lm that cannot batch is generated row by row, with the same samplers and answers."""
    backend, _, chat = demo
    prompts, seeds = _prompts(chat), [3, 4, 5, 6, 7, 8]
    settings = {"max_new_tokens": 20, "temperature": 1.2, "top_p": 0.95, "stop_ids": chat.stop_ids}
    batched = backend.generate(prompts, seeds=seeds, **settings)
    monkeypatch.setattr(backend, "batched_generation", False)
    assert backend.generate(prompts, seeds=seeds, **settings) == batched
    monkeypatch.setattr(backend, "batched_generation", True)
    monkeypatch.setattr(generation, "batchable", lambda model: False)
    assert backend.generate(prompts, seeds=seeds, **settings) == batched


@pytest.mark.parametrize("adapter", [True, False])
def test_mlx_greedy_equals_torch_greedy_with_the_adapter_on_and_off(demo, adapter: bool) -> None:
    mlx_backend, torch_backend, chat = demo
    prompts = _prompts(chat)
    settings = {"max_new_tokens": 24, "stop_ids": chat.stop_ids, "pad_id": chat.pad_id, "adapter": adapter}
    mlx_answers = mlx_backend.generate(prompts, **settings)
    assert mlx_answers == torch_backend.generate(prompts, **settings)
    if adapter:  # the LoRA weights matter: with them off, the answers differ
        assert mlx_answers != mlx_backend.generate(prompts, **{**settings, "adapter": False})
