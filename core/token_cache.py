"""Tokenized pairs cached on disk, keyed by everything the tokens depend on.

Rendering chat templates and tokenizing is the slow part of preparing a large data set (minutes for
tens of thousands of pairs); the key is the pairs' own content, the tokenizer (its full serialized
form), the chat template and the truncation settings, so a hit is always the very tokens a fresh
tokenization would give: the template is keyed on what it renders, which for some templates depends on
the day.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.atomic import remove_stale_temporaries, write_safetensors
from core.data import PreferencePair
from core.errors import TemplateError
from core.tokenization import ChatTokenizer, TokenizedPair, TokenizeReport, tokenize_pairs

REPORT_FIELDS = (
    "pairs_in",
    "pairs_out",
    "dropped_no_response",
    "prompt_truncated",
    "chosen_truncated",
    "rejected_truncated",
    "template_fallback",
    "skipped_template_errors",
)


def pairs_fingerprint(pairs: list[PreferencePair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(
            json.dumps(
                [pair.system, [(m.role, m.content) for m in pair.prompt], pair.chosen, pair.rejected],
                ensure_ascii=False,
            ).encode()
        )
    return digest.hexdigest()


def tokenizer_fingerprint(chat: ChatTokenizer) -> str:
    tokenizer = chat.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    special = repr(sorted(tokenizer.special_tokens_map.items())) + repr(chat.adds_bos)
    return hashlib.sha256((described + special).encode()).hexdigest()


_PROBE_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
)


def template_fingerprint(chat: ChatTokenizer) -> str:
    """The template's text and what it renders now. Some templates render more than the messages: Llama 3.x
    writes today's date into the system turn (``strftime_now``), so the same text gives other tokens on another
    day; keying on the rendering (and on the date, for a template that reads the clock but renders nothing of it
    for the probe) makes such a change a cache miss, never stale tokens."""
    parts = [chat.template]
    for with_system in (True, False):
        messages = list(_PROBE_CONVERSATION[0 if with_system else 1 :])
        for generation_prompt in (True, False):
            try:
                parts.append(chat.render(messages, generation_prompt))
            except TemplateError as exc:  # a template that refuses the probe (no system turn, say)
                parts.append(f"refused: {exc}")
    if "strftime_now" in chat.template:
        parts.append(datetime.date.today().isoformat())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(
    pairs: list[PreferencePair], chat: ChatTokenizer, max_length: int, max_prompt_length: int | None, skip_invalid: bool
) -> str:
    parts = [
        "duet-tokens-v2",
        pairs_fingerprint(pairs),
        tokenizer_fingerprint(chat),
        template_fingerprint(chat),
        str(max_length),
        str(max_prompt_length),
        str(skip_invalid),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def save(path: Path, tokenized: list[TokenizedPair], report: TokenizeReport) -> None:
    lengths = np.array(
        [[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)] for p in tokenized], dtype=np.int64
    ).reshape(-1, 3)
    flags = np.array(
        [[p.prompt_truncated, p.chosen_truncated, p.rejected_truncated] for p in tokenized], dtype=np.uint8
    ).reshape(-1, 3)
    ids = (
        np.concatenate([np.concatenate([p.prompt_ids, p.chosen_ids, p.rejected_ids]) for p in tokenized])
        if tokenized
        else np.zeros(0, np.int32)
    )
    index = np.array([p.index for p in tokenized], dtype=np.int64)
    metadata = {
        "report": json.dumps({k: getattr(report, k) for k in REPORT_FIELDS}),
        "warnings": json.dumps(report.warnings),
        "template": report.template,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, {"index": index, "lengths": lengths, "flags": flags, "ids": ids.astype(np.int32)}, metadata)


def load(path: Path) -> tuple[list[TokenizedPair], TokenizeReport]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
        arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no iterator
    tokenized, offset = [], 0
    for index, (p, c, r), (fp, fc, fr) in zip(arrays["index"], arrays["lengths"], arrays["flags"], strict=True):
        ids = arrays["ids"][offset : offset + p + c + r]
        offset += p + c + r
        tokenized.append(
            TokenizedPair(
                int(index), ids[:p].copy(), ids[p : p + c].copy(), ids[p + c :].copy(), bool(fp), bool(fc), bool(fr)
            )
        )
    report = TokenizeReport(template=metadata["template"], **json.loads(metadata["report"]))
    report.warnings = json.loads(metadata["warnings"])
    report.lengths = {
        "prompt": arrays["lengths"][:, 0],
        "chosen": arrays["lengths"][:, 1],
        "rejected": arrays["lengths"][:, 2],
        "pair": arrays["lengths"][:, 0] + arrays["lengths"][:, 1:].max(axis=1),
    }
    return tokenized, report


def tokenize_cached(
    pairs: list[PreferencePair],
    chat: ChatTokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None,
    skip_invalid: bool,
    cache_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[TokenizedPair], TokenizeReport, bool]:
    """(tokenized pairs, report, whether they came from the cache); no cache folder: plain tokenization."""

    def tokenize() -> tuple[list[TokenizedPair], TokenizeReport]:
        return tokenize_pairs(
            pairs,
            chat,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            skip_invalid=skip_invalid,
            progress=progress,
        )

    if cache_dir is None:
        return (*tokenize(), False)
    path = (
        cache_dir / "tokenized" / f"{cache_key(pairs, chat, max_length, max_prompt_length, skip_invalid)}.safetensors"
    )
    remove_stale_temporaries(path.parent)
    if path.is_file():
        try:
            tokenized, report = load(path)
            return tokenized, report, True
        except Exception:  # a damaged entry (safetensors raises its own types): tokenize again and replace it
            pass
    tokenized, report = tokenize()
    save(path, tokenized, report)
    return tokenized, report, False
