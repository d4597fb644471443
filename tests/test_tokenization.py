"""Exact tokenization: real tokenizers and templates, every fixture row, boundaries, BOS and truncation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.batching import collate
from core.data import Message, PreferencePair, load_preferences
from core.errors import DataError, TemplateError
from core.tokenization import PLAIN_TEMPLATE, ChatTokenizer, tokenize_pairs, truncate_pair
from models.tiny_tokenizer import build_bpe_tokenizer

FIXTURE_FILES = (
    "llamafactory_dpo_en_demo.json",
    "firefly_ultrafeedback_binarized_sample.jsonl",
    "llamafactory_v1_dpo_demo.jsonl",
    "torchtune_hh_rlhf_tiny.json",
)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_every_fixture_row_splits_exactly_at_the_prompt(fixture_data: Path, fixture_tokenizer, name: str) -> None:
    """decode(prompt) + decode(reply) == the rendered conversation; one BOS; mask sum == reply length."""
    pairs, _ = load_preferences(fixture_data / name)
    chat = ChatTokenizer(fixture_tokenizer)
    tokenized, report = tokenize_pairs(pairs, chat, max_length=1_000_000, max_prompt_length=None)
    assert report.pairs_out == len(pairs) and report.template_fallback == 0
    bos = fixture_tokenizer.bos_token_id
    for item in tokenized:
        pair = pairs[item.index]
        for reply, ids in ((pair.chosen, item.chosen_ids), (pair.rejected, item.rejected_ids)):
            rendered = fixture_tokenizer.apply_chat_template(
                [*pair.conversation(), {"role": "assistant", "content": reply}], tokenize=False
            )
            assert decode(fixture_tokenizer, item.prompt_ids) + decode(fixture_tokenizer, ids) == rendered
            assert ids[-2:].tolist() == fixture_tokenizer.encode("<|im_end|>\n", add_special_tokens=False)
        if bos is None:
            assert fixture_tokenizer.bos_token is None
        else:  # SmolLM: BOS is <|im_start|>, which also opens every turn; the sequence starts with one, not two
            assert item.prompt_ids[0] == bos and item.prompt_ids[1] != bos
        batch = collate([item], pad_id=chat.pad_id)
        assert batch.loss_mask.sum(axis=1).tolist() == [len(item.chosen_ids), len(item.rejected_ids)]
        assert batch.response_lengths.tolist() == [len(item.chosen_ids), len(item.rejected_ids)]


def test_prompt_is_the_template_with_its_generation_prompt(qwen_tokenizer) -> None:
    pair = PreferencePair((Message("user", "Hi"),), "Hello!", "Go.", system="Be kind.")
    chat = ChatTokenizer(qwen_tokenizer)
    prompt, chosen, rejected, fallback = chat.split_texts(pair)
    assert prompt == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert (chosen, rejected, fallback) == ("Hello!<|im_end|>\n", "Go.<|im_end|>\n", False)


def bos_tokenizer(template: str | None):
    corpus = ["What is two plus two? It is four.", "Hello there, how are you today?"] * 20
    return build_bpe_tokenizer(
        corpus,
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<pad>"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=template,
        add_bos=True,
    )


LLAMA2_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "template",
    [LLAMA2_LIKE, LLAMA2_LIKE.replace("{{ bos_token }}", "")],
    ids=["template-renders-bos", "tokenizer-adds-bos"],
)
def test_exactly_one_bos_whoever_adds_it(template: str) -> None:
    tokenizer = bos_tokenizer(template)
    chat = ChatTokenizer(tokenizer)
    assert chat.adds_bos
    pair = PreferencePair((Message("user", "What is two plus two?"),), "It is four.", "Hello there.")
    [item], _ = tokenize_pairs([pair], chat, max_length=512)
    ids = np.concatenate([item.prompt_ids, item.chosen_ids])
    assert ids[0] == tokenizer.bos_token_id and (ids == tokenizer.bos_token_id).sum() == 1
    assert item.chosen_ids[-1] == tokenizer.eos_token_id


def test_plain_fallback_when_the_tokenizer_has_no_template() -> None:
    tokenizer = bos_tokenizer(None)
    chat = ChatTokenizer(tokenizer)
    assert chat.template == PLAIN_TEMPLATE and "fallback" in chat.template_source
    pair = PreferencePair((Message("user", "Hello there"),), "It is four.", "What?", system="Be brief.")
    prompt, chosen, _, _ = chat.split_texts(pair)
    assert prompt == "Be brief.\n\n### User:\nHello there\n\n### Assistant:\n"
    assert chosen == "It is four.</s>\n\n"
    [item], _ = tokenize_pairs([pair], chat, max_length=512)
    assert item.prompt_ids[0] == tokenizer.bos_token_id and (item.prompt_ids == tokenizer.bos_token_id).sum() == 1


def test_eos_is_added_when_the_template_closes_turns_without_a_special_token() -> None:
    tokenizer = bos_tokenizer(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    chat = ChatTokenizer(tokenizer)
    _, chosen, _, _ = chat.split_texts(PreferencePair((Message("user", "Hi"),), "Hello", "Bye"))
    assert chosen == "Hello\n</s>"


def test_templates_that_rewrite_past_turns_fall_back_to_the_inference_prompt() -> None:
    # Like reasoning templates that strip past thoughts: the final render differs from the generation prompt.
    template = (
        "{% if not add_generation_prompt %}[final]{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer = bos_tokenizer(template)
    chat = ChatTokenizer(tokenizer)
    pair = PreferencePair((Message("user", "Hi"),), "Hello", "Bye")
    prompt, chosen, rejected, fallback = chat.split_texts(pair)
    assert fallback and prompt == "<user>Hi</s><assistant>"
    assert (chosen, rejected) == ("Hello</s>", "Bye</s>")
    _, report = tokenize_pairs([pair], chat, max_length=64)
    assert report.template_fallback == 1


def test_template_errors_name_the_row_or_are_skipped() -> None:
    tokenizer = bos_tokenizer(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('need a system turn') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    chat = ChatTokenizer(tokenizer)
    from core.data.records import Location

    pair = PreferencePair((Message("user", "Hi"),), "Hello", "Bye", location=Location("d.jsonl", line=7))
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:7: the chat template cannot render this conversation: "
        r"need a system turn",
    ):
        tokenize_pairs([pair], chat, max_length=64)
    tokenized, report = tokenize_pairs([pair], chat, max_length=64, skip_invalid=True)
    assert tokenized == [] and report.skipped_template_errors == 1


def test_template_choices() -> None:
    tokenizer = bos_tokenizer(None)
    prompt = ChatTokenizer(tokenizer, "chatml").split_texts(PreferencePair((Message("user", "Hi"),), "A", "B"))[0]
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TemplateError, match=r"chat template 'nope\.jinja': no such file"):
        ChatTokenizer(tokenizer, "nope.jinja")


def test_truncation_keeps_the_prompt_end_and_the_reply_start() -> None:
    prompt = list(range(100, 130))  # 30 tokens
    chosen, rejected = list(range(200, 220)), list(range(300, 305))
    item = truncate_pair(0, prompt, chosen, rejected, max_length=40, max_prompt_length=25, bos_id=None)
    assert item.prompt_ids.tolist() == prompt[-25:] and item.prompt_truncated
    assert item.chosen_ids.tolist() == chosen[:15] and item.chosen_truncated
    assert item.rejected_ids.tolist() == rejected and not item.rejected_truncated
    # a dedicated BOS survives prompt truncation
    item = truncate_pair(0, [1, *prompt], chosen, rejected, max_length=40, max_prompt_length=25, bos_id=1)
    assert item.prompt_ids.tolist() == [1, *prompt[-24:]]
    # nothing left for the replies: dropped
    assert truncate_pair(0, prompt, chosen, rejected, max_length=30, max_prompt_length=None, bos_id=None) is None


def test_truncation_counts_in_the_report(fixture_data: Path, qwen_tokenizer) -> None:
    pairs, _ = load_preferences(fixture_data / "llamafactory_dpo_en_demo.json")
    chat = ChatTokenizer(qwen_tokenizer)
    tokenized, report = tokenize_pairs(pairs, chat, max_length=512, max_prompt_length=256)
    full, _ = tokenize_pairs(pairs, chat, max_length=1_000_000, max_prompt_length=None)
    by_index = {item.index: item for item in full}
    assert report.pairs_out == len(tokenized) == len(pairs)  # the prompt cap leaves room for every reply
    assert report.prompt_truncated == sum(len(i.prompt_ids) > 256 for i in full) > 0
    assert report.chosen_truncated == sum(len(i.prompt_ids[-256:]) + len(i.chosen_ids) > 512 for i in full) > 0
    for item in tokenized:
        assert item.length <= 512 and len(item.prompt_ids) <= 256
        whole = by_index[item.index]
        assert item.prompt_ids.tolist() == whole.prompt_ids[-len(item.prompt_ids) :].tolist()
        assert item.chosen_ids.tolist() == whole.chosen_ids[: len(item.chosen_ids)].tolist()
    tokenized, report = tokenize_pairs(pairs, chat, max_length=300, max_prompt_length=None)
    assert report.dropped_no_response == sum(len(i.prompt_ids) >= 300 for i in full) > 0
    assert report.pairs_out + report.dropped_no_response == len(pairs)


def test_short_replies_get_no_second_eos(fixture_data, qwen_tokenizer) -> None:
    """A reply that is a substring of the end-of-turn marker ("im", "end") is closed exactly once."""
    from transformers import AutoTokenizer

    from tests.conftest import TOKENIZERS

    smol = AutoTokenizer.from_pretrained(TOKENIZERS / "smollm-360m-instruct")
    for tokenizer in (smol, qwen_tokenizer):
        chat = ChatTokenizer(tokenizer)
        for reply in ("end", "im", "s", "|"):
            _, chosen, _, _ = chat.split_texts(PreferencePair((Message("user", "Hi"),), reply, "other"))
            assert chosen == f"{reply}<|im_end|>\n", (reply, chosen)


def test_a_truncated_prompt_keeps_the_bos_the_tokenizer_adds() -> None:
    # Llama-2 style: "<s>[INST]" opens every turn, and the tokenizer adds the first <s> itself
    item = truncate_pair(0, [1, 5, 6, 1, 7, 8, 9], [10], [11], 20, 3, bos_id=1, adds_bos=True)
    assert item.prompt_ids.tolist() == [1, 8, 9]
    item = truncate_pair(0, [1, 5, 6, 1, 7, 8, 9], [10], [11], 20, 3, bos_id=1, adds_bos=False)
    assert item.prompt_ids.tolist() == [7, 8, 9]  # SmolLM style: <|im_start|> is an ordinary turn opener


def test_a_template_with_a_syntax_error_is_reported_as_such() -> None:
    with pytest.raises(TemplateError, match="has a syntax error"):
        ChatTokenizer(bos_tokenizer(None), "{% for m in messages %}{{ m.content }")


def test_the_reply_boundary_check_flags_tokenizers_that_merge_across_it(qwen_tokenizer) -> None:
    assert ChatTokenizer(qwen_tokenizer).boundary_warning is None
    # a generation prompt ending in a space: joined, byte-level BPE merges it into the reply's first word
    chat = ChatTokenizer(
        qwen_tokenizer,
        "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}Answer: {% endif %}",
    )
    assert chat.boundary_warning and "differently on its own" in chat.boundary_warning
