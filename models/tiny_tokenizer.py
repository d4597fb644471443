"""Train a small byte-level BPE tokenizer offline (for the demo model and the tests)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


def build_bpe_tokenizer(
    corpus: Iterable[str],
    *,
    vocab_size: int,
    special_tokens: list[str],
    bos_token: str | None,
    eos_token: str,
    pad_token: str,
    chat_template: str | None,
    add_bos: bool = False,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (lossless decoding of any UTF-8 text) wrapped for transformers.

    ``add_bos`` makes plain encoding prepend ``bos_token``, as Llama-style tokenizers do.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    if add_bos:
        if bos_token is None:
            raise ValueError("add_bos needs a bos_token")
        bos_id = tokenizer.token_to_id(bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token
    )
    wrapped.chat_template = chat_template
    return wrapped
