"""Exact chat-template tokenization of preference pairs, with prompt/response boundaries.

For each pair the prompt is rendered with the chat template and its generation prompt; each reply is the
rest of the rendered conversation (the reply and the template's end of turn). The two parts are tokenized
separately and concatenated, never re-tokenized across the boundary, so the loss mask covers exactly the
tokens the model is asked to produce after the prompt it will see at inference time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.data.records import PreferencePair
from core.errors import DataError, TemplateError

# Used when a tokenizer has no chat template: plain role headers, and EOS closing each assistant turn.
PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}"
    "{%- else -%}{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] + '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\n' }}{%- endif -%}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
BUILTIN_TEMPLATES = {"plain": PLAIN_TEMPLATE, "chatml": CHATML_TEMPLATE}
_SENTINEL = "\u2063DUET-REPLY\u2063"
_PROBE = ({"role": "user", "content": "Hello"},)  # a conversation every template can render


def resolve_chat_template(tokenizer: Any, choice: str | None) -> tuple[str, str]:
    """The Jinja template to use and a short description of where it came from.

    ``choice``: None or "auto" (the tokenizer's own, else the plain fallback), "plain", "chatml", a path
    to a ``.jinja`` file, or a template string.
    """
    if choice in (None, "", "auto"):
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if own:
            return own, "the tokenizer's chat template"
        return PLAIN_TEMPLATE, "the plain fallback template (the tokenizer has no chat template)"
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice], f"the built-in '{choice}' template"
    if "{%" in choice or "{{" in choice:
        return choice, "the template given in the config"
    path = Path(choice).expanduser()
    if not path.is_file():
        raise TemplateError(
            f"chat template '{choice}': no such file. Use auto, plain, chatml, a path to a "
            ".jinja file, or the template itself."
        )
    return path.read_text(encoding="utf-8"), f"the template in {choice}"


@dataclass(eq=False)
class TokenizedPair:
    """Token ids of one pair: the shared prompt and each reply (response tokens only)."""

    index: int  # position of the pair in the loaded data
    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    prompt_truncated: bool = False
    chosen_truncated: bool = False
    rejected_truncated: bool = False
    label: bool | None = None  # an unpaired example's rating (KTO); ``rejected`` is then its mismatched reply

    @property
    def length(self) -> int:
        """The longer of the two sequences (prompt + reply): what batching pads to."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def truncated(self) -> bool:
        return self.prompt_truncated or self.chosen_truncated or self.rejected_truncated


@dataclass
class TokenizeReport:
    template: str
    pairs_in: int = 0
    pairs_out: int = 0
    dropped_no_response: int = 0
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    template_fallback: int = 0  # pairs whose template renders earlier turns differently once a reply follows
    skipped_template_errors: int = 0
    warnings: list[str] = field(default_factory=list)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)  # prompt / chosen / rejected / pair

    def percentiles(self, which: str, points: tuple[int, ...] = (50, 90, 99, 100)) -> dict[int, int]:
        values = self.lengths.get(which)
        if values is None or len(values) == 0:
            return {p: 0 for p in points}
        return {p: int(np.percentile(values, p, method="higher")) for p in points}


class ChatTokenizer:
    """A Hugging Face tokenizer plus the chat template used to split pairs into prompt and replies."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template, self.template_source = resolve_chat_template(tokenizer, chat_template)
        self.bos_id: int | None = tokenizer.bos_token_id
        self.eos_id: int | None = tokenizer.eos_token_id
        self.pad_id: int = next(i for i in (tokenizer.pad_token_id, self.eos_id, 0) if i is not None)
        with_special = tokenizer("a").input_ids
        without = tokenizer("a", add_special_tokens=False).input_ids
        self.adds_bos = self.bos_id is not None and len(with_special) > len(without) and with_special[0] == self.bos_id
        self.special_texts = {t for t in tokenizer.all_special_tokens if t}
        self.special_texts |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        self._stop_ids: list[int] | None = None
        self._turn_tail: str | None = None  # what the template writes after a reply's content
        self.boundary_warning: str | None = None
        self._probe_template()

    def _probe_template(self) -> None:
        """Render a one-turn conversation once, up front: a broken template is reported as such (not as a
        problem with row 1), the end-of-turn text is learned, and the prompt/reply boundary is checked."""
        import jinja2

        try:
            marked = self.render([*_PROBE, {"role": "assistant", "content": _SENTINEL}], False)
            prompt = self.render(_PROBE, True)
        except TemplateError as exc:
            if isinstance(exc.__cause__, jinja2.TemplateSyntaxError):
                raise TemplateError(f"{self.template_source} has a syntax error: {exc.__cause__}") from None
            return  # a template that demands more (a system turn, say) is learned from the data instead
        self._turn_tail = marked.partition(_SENTINEL)[2]
        reply = "Sure, here it is."
        joined = self.encode([prompt + reply])[0]
        apart = self.encode([prompt])[0] + self.encode([reply])[0]
        if joined != apart:
            self.boundary_warning = (
                "this tokenizer encodes a reply differently on its own than after its prompt (a SentencePiece "
                "prefix space, say): the first reply token in training may differ from the one generated"
            )

    # -- rendering ------------------------------------------------------------------------------------

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raises its own errors, templates call raise_exception()
            raise TemplateError(f"the chat template cannot render this conversation: {exc}") from exc

    def split_texts(self, pair: PreferencePair) -> tuple[str, str, str, bool]:
        """(prompt text, chosen text, rejected text, used_fallback) for one pair."""
        conversation = pair.conversation()
        prompt = self.render(conversation, add_generation_prompt=True)
        chosen, fallback_c = self._reply_text(conversation, prompt, pair.chosen)
        rejected, fallback_r = self._reply_text(conversation, prompt, pair.rejected)
        return prompt, chosen, rejected, fallback_c or fallback_r

    def _reply_text(self, conversation: list[dict[str, str]], prompt: str, reply: str) -> tuple[str, bool]:
        full = self.render([*conversation, {"role": "assistant", "content": reply}], add_generation_prompt=False)
        if full.startswith(prompt):
            text, fallback = full[len(prompt) :], False
        else:
            # The template renders earlier turns differently once a reply follows (some strip reasoning
            # from past turns). The prompt stays what the model sees at inference; the reply is rendered
            # on its own from a sentinel, so its end-of-turn text is still the template's.
            marked = self.render(
                [*conversation, {"role": "assistant", "content": _SENTINEL}], add_generation_prompt=False
            )
            head, _, tail = marked.partition(_SENTINEL)
            header = head[len(prompt) :] if head.startswith(prompt) else ""
            text, fallback = header + reply + tail, True
        if self._turn_tail is None:
            marked = self.render([*conversation, {"role": "assistant", "content": _SENTINEL}], False)
            self._turn_tail = marked.partition(_SENTINEL)[2]
        if self.tokenizer.eos_token and not any(mark in self._turn_tail for mark in self.special_texts):
            text += self.tokenizer.eos_token  # the template closes a turn with no special token: add EOS
        return text, fallback

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # verbose=False: our own truncation handles long texts, the model-max-length warning is noise
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def prompt_ids(self, conversation: list[dict[str, str]]) -> list[int]:
        """The ids a model is given to reply to ``conversation`` (template, generation prompt, BOS)."""
        return self.with_bos(self.encode([self.render(conversation, add_generation_prompt=True)])[0])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a reply: EOS and the special tokens the template closes a turn with."""
        if self._stop_ids is None:
            tail = self.encode([self._turn_tail or ""])[0]
            special = set(self.tokenizer.all_special_ids)
            ids = [self.eos_id] if self.eos_id is not None else []
            self._stop_ids = ids + [t for t in tail if t in special and t not in ids]
        return self._stop_ids

    def with_bos(self, prompt_ids: list[int]) -> list[int]:
        """Exactly one BOS at the start when the tokenizer uses one: never none, never two."""
        if self.bos_id is None:
            return prompt_ids
        if self.adds_bos and (not prompt_ids or prompt_ids[0] != self.bos_id):
            return [self.bos_id, *prompt_ids]
        while len(prompt_ids) > 1 and prompt_ids[0] == self.bos_id and prompt_ids[1] == self.bos_id:
            prompt_ids = prompt_ids[1:]
        return prompt_ids


def tokenize_pairs(
    pairs: list[PreferencePair],
    chat_tokenizer: ChatTokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    skip_invalid: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Tokenize every pair; truncate (prompt from the left, replies from the right); drop empty replies.
    ``progress(done, total)`` follows the rendering of the chat template, the slow part."""
    report = TokenizeReport(template=chat_tokenizer.template_source, pairs_in=len(pairs))
    if chat_tokenizer.boundary_warning:
        report.warnings.append(chat_tokenizer.boundary_warning)
    texts: list[tuple[int, str, str, str]] = []
    for index, pair in enumerate(pairs):
        try:
            prompt, chosen, rejected, fallback = chat_tokenizer.split_texts(pair)
        except TemplateError as exc:
            if not skip_invalid:
                raise DataError(f"{pair.location}: {exc}. Fix the row or the template, or skip invalid rows.") from None
            report.skipped_template_errors += 1
            continue
        report.template_fallback += fallback
        texts.append((index, prompt, chosen, rejected))
        if progress is not None:
            progress(index + 1, len(pairs))
    prompt_ids = chat_tokenizer.encode([t[1] for t in texts])
    chosen_ids = chat_tokenizer.encode([t[2] for t in texts])
    rejected_ids = chat_tokenizer.encode([t[3] for t in texts])

    tokenized: list[TokenizedPair] = []
    for (index, *_), prompt, chosen, rejected in zip(texts, prompt_ids, chosen_ids, rejected_ids, strict=True):
        item = truncate_pair(
            index,
            chat_tokenizer.with_bos(prompt),
            chosen,
            rejected,
            max_length,
            max_prompt_length,
            chat_tokenizer.bos_id,
            chat_tokenizer.adds_bos,
        )
        if item is None:
            report.dropped_no_response += 1
            continue
        report.prompt_truncated += item.prompt_truncated
        report.chosen_truncated += item.chosen_truncated
        report.rejected_truncated += item.rejected_truncated
        tokenized.append(item)
    report.pairs_out = len(tokenized)
    report.lengths = {
        "prompt": np.array([len(p.prompt_ids) for p in tokenized], dtype=np.int64),
        "chosen": np.array([len(p.chosen_ids) for p in tokenized], dtype=np.int64),
        "rejected": np.array([len(p.rejected_ids) for p in tokenized], dtype=np.int64),
        "pair": np.array([p.length for p in tokenized], dtype=np.int64),
    }
    return tokenized, report


def truncate_pair(
    index: int,
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int,
    max_prompt_length: int | None,
    bos_id: int | None,
    adds_bos: bool = False,
) -> TokenizedPair | None:
    """Keep the end of a long prompt (and its BOS), cut replies at ``max_length``; None if a reply is lost."""
    prompt_truncated = bool(max_prompt_length) and len(prompt) > max_prompt_length
    if prompt_truncated:
        # A BOS the tokenizer adds, or one that starts the sequence only once, is a true sequence start and
        # stays; one that also opens every turn (SmolLM's <|im_start|>) is cut like any other token.
        keep_bos = bos_id is not None and prompt[0] == bos_id and (adds_bos or prompt.count(bos_id) == 1)
        tail = max_prompt_length - 1 if keep_bos else max_prompt_length
        prompt = ([bos_id] if keep_bos else []) + prompt[len(prompt) - tail :]
    budget = max_length - len(prompt)
    if budget <= 0 or not chosen or not rejected:
        return None
    return TokenizedPair(
        index=index,
        prompt_ids=np.asarray(prompt, dtype=np.int32),
        chosen_ids=np.asarray(chosen[:budget], dtype=np.int32),
        rejected_ids=np.asarray(rejected[:budget], dtype=np.int32),
        prompt_truncated=prompt_truncated,
        chosen_truncated=len(chosen) > budget,
        rejected_truncated=len(rejected) > budget,
    )
