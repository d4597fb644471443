"""``duet inspect``: what Duet will train on, before it trains.

Loads and validates the data, tokenizes it exactly as training will, and prints the detected format,
counts, length percentiles, truncation and drops, then one pair token by token with the prompt/reply
boundary and the loss mask visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from core.batching import padding_fraction, plan_batches
from core.data import LoadReport, PreferencePair, load_preferences
from core.data.load import MAX_EXAMPLES, display_path
from core.data.unpaired import with_mismatched_replies
from core.errors import DataError
from core.tokenization import ChatTokenizer, TokenizedPair, TokenizeReport, tokenize_pairs

# Two alternating shades per region make token boundaries visible without separators.
PROMPT_STYLES = ("grey62 on grey15", "grey70 on grey23")
CHOSEN_STYLES = ("black on green3", "black on dark_sea_green2")
REJECTED_STYLES = ("black on light_salmon1", "black on wheat1")
SPECIAL_STYLE = "bold magenta"
PROMPT_HEAD_TAIL = 200  # tokens of a long prompt shown at each end unless --full


@dataclass
class Inspection:
    pairs: list[PreferencePair]
    load_report: LoadReport
    tokenized: list[TokenizedPair]
    tokenize_report: TokenizeReport
    chat_tokenizer: ChatTokenizer


def inspect_data(
    source: str,
    tokenizer: Any,
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    chat_template: str | None = "auto",
    max_length: int = 1024,
    max_prompt_length: int | None = 512,
    max_examples: int | None = MAX_EXAMPLES,
) -> Inspection:
    pairs, load_report = load_preferences(
        source, format=format, columns=columns, split=split, skip_invalid=skip_invalid, max_examples=max_examples
    )
    if pairs and pairs[0].is_unpaired:  # rated replies (KTO): inspected as they train, with a mismatched reply
        load_report.desirable = sum(1 for p in pairs if p.label)
        load_report.undesirable = len(pairs) - load_report.desirable
        pairs = with_mismatched_replies(pairs, seed=0)
    chat_tokenizer = ChatTokenizer(tokenizer, chat_template)
    tokenized, tokenize_report = tokenize_pairs(
        pairs, chat_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, skip_invalid=skip_invalid
    )
    return Inspection(pairs, load_report, tokenized, tokenize_report, chat_tokenizer)


def summary(inspection: Inspection, batch_size: int = 4, seed: int = 0) -> Group:
    load, tok = inspection.load_report, inspection.tokenize_report
    lines = [Text(line) for line in load.summary_lines()]
    lines.append(Text(f"template: {tok.template}"))
    if tok.template_fallback:
        lines.append(
            Text(
                f"  {tok.template_fallback} pairs: the template renders earlier turns differently "
                "once a reply follows; their replies were rendered on their own",
                style="yellow",
            )
        )
    table = Table(title="tokens per pair", title_justify="left", show_edge=False)
    table.add_column("")
    for point in ("p50", "p90", "p99", "max"):
        table.add_column(point, justify="right")
    for which in ("prompt", "chosen", "rejected", "pair"):
        values = tok.percentiles(which)
        table.add_row(which, *(str(v) for v in values.values()))
    lines.append(table)
    truncation = (
        f"truncation: {tok.prompt_truncated} prompts cut from the left, {tok.chosen_truncated} chosen "
        f"and {tok.rejected_truncated} rejected replies cut from the right; "
        f"{tok.dropped_no_response} pairs dropped (no reply token left within max_length)"
    )
    lines.append(Text(truncation, style="yellow" if tok.dropped_no_response else ""))
    if tok.skipped_template_errors:
        lines.append(
            Text(f"{tok.skipped_template_errors} pairs skipped: the chat template rejected them", style="yellow")
        )
    if inspection.tokenized:
        lengths = [p.length for p in inspection.tokenized]
        grouped = padding_fraction(inspection.tokenized, plan_batches(lengths, batch_size, seed=seed))
        plain = padding_fraction(
            inspection.tokenized, plan_batches(lengths, batch_size, seed=seed, group_by_length=False)
        )
        lines.append(
            Text(f"padding at batch size {batch_size}: {grouped:.1%} with length grouping ({plain:.1%} without)")
        )
    lines.append(
        Text(f"usable pairs: {tok.pairs_out} of {load.rows} rows", style="bold green" if tok.pairs_out else "bold red")
    )
    return Group(*lines)


def render_pair(inspection: Inspection, position: int = 0, full: bool = False) -> Text:
    """One tokenized pair, token by token: the prompt (masked, grey), then each reply (in the loss)."""
    item = inspection.tokenized[position]
    tokenizer = inspection.chat_tokenizer.tokenizer
    pair = inspection.pairs[item.index]
    text = Text()
    where = str(pair.location).replace(pair.location.source, display_path(pair.location.source), 1)
    text.append(f"pair {position} ({where}) — ", style="bold")
    text.append("prompt: masked, not in the loss", style=PROMPT_STYLES[0])
    text.append("  ")
    text.append("reply: in the loss", style=CHOSEN_STYLES[0])
    text.append("  ")
    text.append("special token", style=SPECIAL_STYLE)
    text.append("\n")
    if item.prompt_truncated:
        text.append(f"✂ prompt truncated from the left to {len(item.prompt_ids)} tokens\n", style="bold yellow")
    text.append(f"── prompt ({len(item.prompt_ids)} tokens, masked) ──\n", style="bold")
    _append_tokens(text, tokenizer, item.prompt_ids.tolist(), PROMPT_STYLES, full)
    for name, ids, styles, cut in (
        ("chosen", item.chosen_ids, CHOSEN_STYLES, item.chosen_truncated),
        ("rejected", item.rejected_ids, REJECTED_STYLES, item.rejected_truncated),
    ):
        text.append(f"\n▶── {name} reply ({len(ids)} tokens, in the loss) ──\n", style="bold")
        _append_tokens(text, tokenizer, ids.tolist(), styles, True)
        if cut:
            text.append(" ✂ reply truncated at max_length", style="bold yellow")
    return text


def _append_tokens(text: Text, tokenizer: Any, ids: list[int], styles: tuple[str, str], full: bool) -> None:
    pieces = _token_pieces(tokenizer, ids)
    if not full and len(pieces) > 2 * PROMPT_HEAD_TAIL:
        hidden = len(pieces) - 2 * PROMPT_HEAD_TAIL
        pieces = [
            *pieces[:PROMPT_HEAD_TAIL],
            (f"\n… {hidden} tokens not shown (--full shows all) …\n", None),
            *pieces[-PROMPT_HEAD_TAIL:],
        ]
    special = set(tokenizer.all_special_ids)
    special |= {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    for number, (piece, token_id) in enumerate(pieces):
        if token_id is None:
            text.append(piece, style="italic")
            continue
        style = SPECIAL_STYLE if token_id in special else styles[number % 2]
        shown = piece.replace("\n", "⏎\n").replace("\t", "⇥")
        text.append(shown or "∅", style=style)


def _token_pieces(tokenizer: Any, ids: list[int]) -> list[tuple[str, int]]:
    """Each token's text; tokens that only make sense together (one UTF-8 character split over several
    byte-level tokens) are shown as one piece."""
    pieces: list[tuple[str, int]] = []
    pending: list[int] = []
    for token_id in ids:
        pending.append(token_id)
        piece = tokenizer.decode(pending, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if piece.endswith("\ufffd") and len(pending) < 4:
            continue
        pieces.append((piece, pending[0]))
        pending = []
    if pending:
        pieces.append((tokenizer.decode(pending, skip_special_tokens=False), pending[0]))
    return pieces


def run_inspect(
    source: str,
    model: str,
    *,
    console: Console,
    skip_invalid: bool = False,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    split: str = "train",
    chat_template: str = "auto",
    max_length: int = 1024,
    max_prompt_length: int | None = 512,
    show: int = 0,
    full: bool = False,
    batch_size: int = 4,
    trust_remote_code: bool = False,
) -> int:
    """The command: print the summary and one pair. Returns 0 when the data is usable, 2 when it is not."""
    from core.models_io import load_tokenizer

    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    inspection = inspect_data(
        source,
        tokenizer,
        format=format,
        columns=columns,
        split=split,
        skip_invalid=skip_invalid,
        chat_template=chat_template,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_examples=None,  # every bad row: data errors point here to list them
    )
    console.print(summary(inspection, batch_size=batch_size))
    if not inspection.tokenized:
        raise DataError(
            f"{source}: no usable pair: every pair lost its replies to truncation "
            f"(max_length {max_length}, max_prompt_length {max_prompt_length}). Raise max_length "
            "or lower max_prompt_length."
        )
    if not 0 <= show < len(inspection.tokenized):
        raise DataError(
            f"--show {show}: there are {len(inspection.tokenized)} usable pairs (0 to {len(inspection.tokenized) - 1})."
        )
    console.print()
    console.print(render_pair(inspection, show, full=full))
    return 0
