"""Generation: greedy tokens equal transformers' ``generate`` token for token (batched, left-padded, adapter
on and off), each sampled row depends only on its own prompt, seed and settings (not on the batch), top-k
and top-p match a NumPy reference, and MLX greedy equals torch greedy on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.settings import resolve_config
from backends.torch_backend.backend import TorchBackend
from backends.torch_backend.generation import RowSampling, _filtered_probs
from core.tokenization import ChatTokenizer
from tests.helpers import DEMO_MODEL

QUESTIONS = ["Name a tree.", "Can you name a river, please?", "Name a bird.", "What is your favourite fruit, friend?"]


@pytest.fixture(scope="module")
def torch_demo() -> tuple[TorchBackend, ChatTokenizer]:
    config = resolve_config(None, [f"model.path={DEMO_MODEL}"])
    backend = TorchBackend(device="cpu", dtype="float32")
    backend.load_model(str(DEMO_MODEL))
    backend.seed(0)
    backend.attach_lora(config.lora)
    with torch.no_grad():  # a LoRA that changes the replies, so "adapter on" differs from off
        for name, parameter in backend.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return backend, ChatTokenizer(backend.tokenizer)


def _prompts(chat: ChatTokenizer) -> list[list[int]]:
    return [chat.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.mark.parametrize(("adapter", "penalty"), [(False, 1.0), (True, 1.0), (True, 3.0), (False, 3.0)])
def test_greedy_equals_transformers_generate_token_for_token(torch_demo, adapter: bool, penalty: float) -> None:
    backend, chat = torch_demo
    prompts = _prompts(chat)
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    ours = backend.generate(
        prompts,
        max_new_tokens=20,
        adapter=adapter,
        stop_ids=chat.stop_ids,
        pad_id=chat.pad_id,
        repetition_penalty=penalty,
    )
    for prompt, mine in zip(prompts, ours, strict=True):
        with backend._adapter_disabled(adapter), torch.no_grad():
            theirs = backend.model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                max_new_tokens=20,
                do_sample=False,
                repetition_penalty=penalty,
                eos_token_id=chat.stop_ids,
                pad_token_id=chat.pad_id,
            )[0, len(prompt) :].tolist()
        cut = next((i for i, t in enumerate(theirs) if t in chat.stop_ids), len(theirs))
        assert mine == theirs[:cut]


def test_a_sampled_row_depends_on_its_seed_not_on_the_batch(torch_demo) -> None:
    backend, chat = torch_demo
    prompts = _prompts(chat)
    settings = {"max_new_tokens": 16, "temperature": 1.0, "stop_ids": chat.stop_ids, "pad_id": chat.pad_id}
    batched = backend.generate(prompts, seeds=[11, 12, 13, 14], **settings)
    alone = [backend.generate([p], seeds=[s], **settings)[0] for p, s in zip(prompts, [11, 12, 13, 14], strict=True)]
    assert batched == alone
    assert backend.generate(prompts, seeds=[11, 12, 13, 14], **settings) == batched  # and again
    shuffled = backend.generate(prompts[::-1], seeds=[14, 13, 12, 11], **settings)
    assert shuffled == batched[::-1]
    mixed = backend.generate(prompts[:2], seeds=[11, 12], temperatures=[1.0, 0.0], **settings)
    greedy = backend.generate(prompts[1:2], **{**settings, "temperature": 0.0})
    assert mixed[0] == batched[0] and mixed[1] == greedy[0]


def test_top_k_one_and_a_tiny_top_p_are_greedy(torch_demo) -> None:
    backend, chat = torch_demo
    prompts = _prompts(chat)
    greedy = backend.generate(prompts, max_new_tokens=12, stop_ids=chat.stop_ids, pad_id=chat.pad_id)
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = backend.generate(
            prompts, max_new_tokens=12, temperature=1.3, seeds=[1, 2, 3, 4], stop_ids=chat.stop_ids, **extra
        )
        assert sampled == greedy, extra


def test_streamed_tokens_arrive_in_order(torch_demo) -> None:
    backend, chat = torch_demo
    seen: list[tuple[int, int]] = []
    out = backend.generate(
        _prompts(chat)[:2],
        max_new_tokens=10,
        temperature=1.0,
        seeds=[5, 6],
        stop_ids=chat.stop_ids,
        stream=lambda row, token: seen.append((row, token)),
    )
    assert [t for r, t in seen if r == 0] == out[0] and [t for r, t in seen if r == 1] == out[1]


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.7), (7, 0.5), (0, 0.05)])
def test_top_k_and_top_p_match_a_numpy_reference(top_k: int, top_p: float) -> None:
    logits = np.random.default_rng(top_k * 10 + int(top_p * 100)).normal(0, 2, size=50)
    temperature = 0.8
    scores = logits / temperature
    if top_k:
        scores = np.where(scores < np.sort(scores)[-top_k], -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    above = np.cumsum(probs[order]) - probs[order]
    kept = np.zeros_like(probs)
    kept[order[above < top_p]] = probs[order[above < top_p]]
    ours = _filtered_probs(torch.tensor(logits, dtype=torch.float64), RowSampling(temperature, top_p, top_k, 0))
    np.testing.assert_allclose(ours.numpy(), kept, rtol=1e-12, atol=1e-15)


def test_mlx_greedy_equals_torch_greedy_on_the_same_weights(torch_demo) -> None:
    pytest.importorskip("mlx.core")
    from backends.mlx_backend.backend import MlxBackend

    _, chat = torch_demo
    config = resolve_config(None, [f"model.path={DEMO_MODEL}"])
    torch_backend = TorchBackend(device="cpu", dtype="float32")
    torch_backend.load_model(str(DEMO_MODEL))
    torch_backend.attach_lora(config.lora)
    mlx_backend = MlxBackend(dtype="float32")
    mlx_backend.load_model(str(DEMO_MODEL))
    mlx_backend.attach_lora(config.lora)
    prompts = _prompts(chat)
    settings = {"max_new_tokens": 20, "stop_ids": chat.stop_ids, "pad_id": chat.pad_id, "adapter": False}
    assert mlx_backend.generate(prompts, **settings) == torch_backend.generate(prompts, **settings)
    penalized = {**settings, "repetition_penalty": 3.0}
    assert mlx_backend.generate(prompts, **penalized) == torch_backend.generate(prompts, **penalized)
    assert torch_backend.generate(prompts, **penalized) != torch_backend.generate(prompts, **settings)


def test_bf16_generation_merges_the_adapter_and_follows_its_weights(torch_demo) -> None:
    """sampling.precision=bfloat16: greedy answers equal transformers' greedy generate on a bf16 model into
    which PEFT merged the same adapter (adapter on), or the bf16 base (off); the copy is kept while the
    adapter's weights stay the same and rebuilt when they change; sampled rows still depend on their seed only."""
    import copy

    backend, chat = torch_demo
    fast = copy.copy(backend)  # the same model and adapter, its own cache of generation copies
    fast.generation_precision, fast._generation_models = "bfloat16", {}
    prompts = _prompts(chat)
    for adapter in (True, False):
        ours = fast.generate(prompts, max_new_tokens=20, adapter=adapter, stop_ids=chat.stop_ids, pad_id=chat.pad_id)
        reference = copy.deepcopy(backend.model)
        reference = (reference.merge_and_unload() if adapter else reference.unload()).to(torch.bfloat16).eval()
        for prompt, mine in zip(prompts, ours, strict=True):
            with torch.no_grad():
                theirs = reference.generate(
                    input_ids=torch.tensor([prompt]),
                    attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                    max_new_tokens=20,
                    do_sample=False,
                    eos_token_id=chat.stop_ids,
                    pad_token_id=chat.pad_id,
                )[0, len(prompt) :].tolist()
            cut = next((i for i, t in enumerate(theirs) if t in chat.stop_ids), len(theirs))
            assert mine == theirs[:cut]
    assert fast.generation_dtype == "bfloat16"
    kept = fast.generation_model(True)
    assert fast.generation_model(True) is kept  # unchanged weights: the same copy
    settings = {"max_new_tokens": 12, "temperature": 1.0, "stop_ids": chat.stop_ids, "pad_id": chat.pad_id}
    before = fast.generate(prompts, seeds=[1, 2, 3, 4], **settings)
    assert fast.generate(prompts, seeds=[1, 2, 3, 4], **settings) == before
    assert [fast.generate([p], seeds=[s], **settings)[0] for p, s in zip(prompts, [1, 2, 3, 4], strict=True)] == before
    lora_b = next(p for n, p in backend.model.named_parameters() if "lora_B" in n)
    saved = lora_b.detach().clone()
    try:
        with torch.no_grad():
            lora_b.add_(0.5)  # what an optimizer step does: in place
        assert fast.generation_model(True) is not kept
    finally:
        with torch.no_grad():
            lora_b.copy_(saved)


def test_a_sliding_window_model_generates_as_transformers_does() -> None:
    """Layers with a sliding window keep only their last window in the cache: the batch is then prefilled
    padded, as transformers does, and greedy answers still equal ``generate`` one prompt at a time."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from backends.torch_backend.generation import _prefill_distinct, sample

    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        use_sliding_window=True,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    prompts = [list(range(10, 30)), list(range(40, 52)), list(range(60, 87))]  # longer than the window
    ours = sample(
        model,
        prompts,
        [RowSampling()] * len(prompts),
        max_new_tokens=10,
        stop_ids=[],
        pad_id=0,
        device=torch.device("cpu"),
    )
    for prompt, mine in zip(prompts, ours, strict=True):
        with torch.no_grad():
            theirs = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
        assert mine == theirs

    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=40)
    assert _prefill_distinct(model, prompts, cache, 27, torch.device("cpu")) is None


class PastKeyValuesForward(torch.nn.Module):
    """A model as transformers ≤ 5.17 wrote them: the KV cache comes in as ``past_key_values``; a ``cache``
    argument would fall into ``**kwargs`` unused (here: an error)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        assert "cache" not in kwargs, "the cache was passed by a name this forward does not take"
        return self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            **kwargs,
        )


def test_the_cache_goes_by_the_name_the_models_forward_takes(torch_demo) -> None:
    from backends.torch_backend.generation import cache_argument, sample

    backend, chat = torch_demo
    model = backend.model.get_base_model()
    old = PastKeyValuesForward(model)
    assert (cache_argument(backend.model), cache_argument(model), cache_argument(old)) == (
        "cache",
        "cache",
        "past_key_values",
    )
    prompts = _prompts(chat)
    rows = [RowSampling(temperature=0.8, seed=i) for i in range(len(prompts))]
    settings = {"max_new_tokens": 12, "stop_ids": chat.stop_ids, "pad_id": chat.pad_id, "device": torch.device("cpu")}
    assert sample(old, prompts, rows, **settings) == sample(model, prompts, rows, **settings)


def test_rows_drawn_together_equal_rows_drawn_one_by_one() -> None:
    """The unfiltered rows of a step share one softmax and one cumulative sum: each row still draws the
    token its own generator and distribution give, as when drawn alone (the same uniform, the same sum)."""
    from backends.torch_backend.generation import _choose, _draw

    logits = torch.randn((6, 4099), generator=torch.Generator().manual_seed(0)) * 4
    rows = [RowSampling(temperature=t, seed=i) for i, t in enumerate((1.0, 0.7, 1.0, 0.0, 0.7, 1.3))]
    for step in range(50):
        together = _choose(
            logits, rows, [torch.Generator().manual_seed(r.seed * 100 + step) for r in rows], [False] * 6
        )
        alone = [
            int(logits[i].argmax())
            if row.temperature <= 0
            else _draw(_filtered_probs(logits[i], row), torch.Generator().manual_seed(row.seed * 100 + step))
            for i, row in enumerate(rows)
        ]
        assert together == alone
