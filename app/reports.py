"""What a run tells the user about its data before training, and the demo's before/after report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.events import Events
from core.batching import padding_fraction, plan_batches
from core.config import Config
from core.events import DemoReport, SampleReplies
from core.prepare import PreparedData


def data_warnings(data: PreparedData) -> list[str]:
    """What the user should know about the data before hours of training on it."""
    warnings = []
    for split in (data.train, data.eval):
        if split is None or (split is data.eval and split.load_report is data.train.load_report):
            continue  # held out of the training file: its reports are the training file's, said once
        load, tokens = split.load_report, split.tokenize_report
        if load.duplicates and not load.duplicates_dropped:
            use = "training" if split is data.train else "evaluation"
            warnings.append(
                f"{load.source}: {load.duplicates} duplicated pairs (e.g. {load.duplicate_examples[0]}) "
                f"count twice in {use}; set data.drop_duplicates=true to keep one of each."
            )
        if load.skipped:
            warnings.append(
                f"{load.source}: skipped {load.skipped_total} invalid rows (data.skip_invalid); first: "
                f"{load.skipped_examples[0]}"
            )
        if tokens.dropped_no_response:
            warnings.append(
                f"{load.source}: {tokens.dropped_no_response} pairs dropped: their prompts leave no room "
                "for a reply within data.max_length."
            )
        warnings += [f"{load.source}: {w}" for w in [*load.warnings, *tokens.warnings]]
    return warnings


def sample_replies_event(backend, data: PreparedData, count: int, max_new_tokens: int, emit: Events) -> None:
    """Greedy replies to the first ``count`` distinct held-out prompts (as trained: the same truncation),
    from the model before training (adapter off) and after (on)."""
    if not data.eval or count <= 0:
        return
    chat, seen, picked = data.chat, set(), []
    for pair in data.eval.tokenized:
        key = tuple(pair.prompt_ids.tolist())
        if key not in seen:
            seen.add(key)
            picked.append(pair)
        if len(picked) == count:
            break
    prompts = [[int(t) for t in pair.prompt_ids] for pair in picked]
    replies = {}
    for label, adapter in (("before", False), ("after", True)):
        generated = backend.generate(
            prompts, max_new_tokens=max_new_tokens, adapter=adapter, stop_ids=chat.stop_ids, pad_id=chat.pad_id
        )
        replies[label] = [chat.decode(ids) for ids in generated]
    rows = []
    for number, pair in enumerate(picked):
        turns = data.eval.pairs[pair.index].conversation()
        asked = next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")
        rows.append({"prompt": asked, "before": replies["before"][number], "after": replies["after"][number]})
    lines = [f"greedy replies to {len(rows)} held-out prompts, before → after training:"]
    for row in rows:
        lines += [
            f"  prompt: {_short(row['prompt'])}",
            f"    before: {_short(row['before'])}",
            f"    after:  {_short(row['after'])}",
        ]
    emit(SampleReplies(rows=rows, message="\n".join(lines)))


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def model_notes(location: str) -> list[str]:
    """What a user should know about the model itself (a quantized GGUF trains as its dequantized weights)."""
    from models.gguf import quantization_note

    note = quantization_note(location) if Path(location).is_dir() else None
    return [note] if note else []


def padding_report(pairs: list, cfg: Config, pad_multiple: int) -> str:
    """One line on how much of the first epoch's batches is padding, and what length grouping saves."""
    lengths = [p.length for p in pairs]

    def padding(grouped: bool) -> float:
        plan = plan_batches(lengths, cfg.train.batch_size, seed=cfg.train.seed, group_by_length=grouped)
        return padding_fraction(pairs, plan, pad_multiple)

    if not cfg.train.shuffle:
        plan = plan_batches(lengths, cfg.train.batch_size, seed=cfg.train.seed, shuffle=False)
        share = padding_fraction(pairs, plan, pad_multiple)
        return f"padding: {share:.1%} of the batches' token positions (train.shuffle is off: the data's own order)"
    if cfg.train.group_by_length:
        return f"padding: {padding(True):.1%} of the batches' token positions ({padding(False):.1%} without grouping)"
    return f"padding: {padding(False):.1%} of the batches' token positions (train.group_by_length is off)"


def demo_report_event(backend, data: PreparedData, emit: Events) -> dict[str, Any]:
    from models.tiny_chat import demo_report, unseen_prompts

    report = demo_report(backend, data.chat, [[{"role": "user", "content": p}] for p in unseen_prompts()])
    accuracy = emit.last_eval.metrics.get("rewards/accuracies", float("nan")) if emit.last_eval else float("nan")
    emit(
        DemoReport(
            report=report,
            message=(
                f"demo: held-out reward accuracy {accuracy:.2f}; concise replies to {report['samples']} prompts "
                f"phrased unlike any training prompt (greedy): {report['base_concise']:.0%} before → "
                f"{report['tuned_concise']:.0%} after\n"
                f"  before: {report['base_examples']}\n  after:  {report['tuned_examples']}"
            ),
        )
    )
    return report
