"""`python -m bench.reference_pass`: the reference pass's tokens/s against a plain transformers no-grad
forward of the same batches, in one process, on the same threads.

    python -m bench.reference_pass --workload smollm2-135m --pairs 64

Three ways over the same tokenized pairs (both rows of each, the adapter off: what a run computes before
its first step):
- ``duet``: ``compute_reference`` as a run calls it (longest first, batches cut by tokens, the chunked
  log-prob kernel and prompt sharing where they pay);
- ``duet, fixed pairs``: the same backend call with a fixed number of pairs a batch (how the pass was cut
  before it batched by tokens);
- ``transformers``: ``AutoModelForCausalLM`` on the same batches as ``duet``, under ``torch.no_grad``, full
  logits, ``log_softmax`` and a gather of the reply tokens: what a plain script would do.
Tokens/s counts the real (unpadded) tokens of both rows. The log-probs of the three are compared too.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from app.api import ChatTokenizer, config_from_dict, create_backend
from bench.worker import model_folder, workload_pairs
from bench.workloads import WORKLOADS
from core.atomic import write_json
from core.batching import collate
from core.reference import compute_reference, token_batches
from core.tokenization import tokenize_pairs


def fixed_batches(pairs, batch_size: int) -> list[list[int]]:
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].length)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def backend_pass(backend, pairs, batches, pad_id: int) -> np.ndarray:
    logps = np.zeros(2 * len(pairs))
    for rows in batches:
        values = backend.sequence_logps(collate([pairs[i] for i in rows], pad_id), adapter=False)
        logps[rows], logps[[len(pairs) + i for i in rows]] = values[: len(rows)], values[len(rows) :]
    return logps


def transformers_pass(model, pairs, batches, pad_id: int) -> np.ndarray:
    import torch

    logps = np.zeros(2 * len(pairs))
    with torch.no_grad():
        for rows in batches:
            batch = collate([pairs[i] for i in rows], pad_id)
            ids = torch.from_numpy(batch.input_ids).long()
            logits = model(input_ids=ids, attention_mask=torch.from_numpy(batch.attention_mask).long()).logits
            token_logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            values = (token_logps * torch.from_numpy(batch.loss_mask[:, 1:]).float()).sum(-1).double().numpy()
            logps[rows], logps[[len(pairs) + i for i in rows]] = values[: len(rows)], values[len(rows) :]
    return logps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference_pass", description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="smollm2-135m", choices=sorted(WORKLOADS))
    parser.add_argument("--pairs", type=int, default=64, help="the first N pairs of the workload's data")
    parser.add_argument(
        "--batch-size", type=int, default=0, help="pairs a batch at the longest (0: 2 × the workload's)"
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    workload = WORKLOADS[args.workload]
    folder = model_folder(workload)
    batch_size = args.batch_size or 2 * workload.batch_pairs
    config = config_from_dict({"model": {"path": str(folder), "backend": "torch", "device": "cpu"}}).validate()
    backend = create_backend(config)
    backend.load_model(str(folder))
    backend.attach_lora(config.lora)
    chat = ChatTokenizer(backend.tokenizer)
    pairs, _ = tokenize_pairs(
        workload_pairs(workload)[: args.pairs],
        chat,
        max_length=workload.max_length,
        max_prompt_length=workload.max_prompt_length,
    )
    tokens = sum(len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    by_tokens = token_batches(pairs, batch_size)

    results: dict[str, dict] = {}

    def timed(name: str, batches: int, run) -> np.ndarray:
        started = time.perf_counter()
        logps = run()
        seconds = time.perf_counter() - started
        results[name] = {"seconds": seconds, "tokens_per_second": tokens / seconds, "batches": batches}
        return logps

    reference = timed(
        "duet",
        len(by_tokens),
        lambda: compute_reference(backend, pairs, batch_size=batch_size, pad_id=chat.pad_id, adapter=False).rows(),
    )
    duet = np.concatenate([reference[:, 1], reference[:, 2]])
    fixed = fixed_batches(pairs, batch_size)
    old = timed("duet, fixed pairs", len(fixed), lambda: backend_pass(backend, pairs, fixed, chat.pad_id))
    theirs = timed("transformers", len(by_tokens), lambda: transformers_pass(plain, pairs, by_tokens, chat.pad_id))
    for name, values in (("duet, fixed pairs", old), ("transformers", theirs)):
        results[name]["max_abs_logp_difference_to_duet"] = float(np.abs(values - duet).max())

    table = Table(
        title=f"reference pass, {args.workload}: {len(pairs)} pairs ({tokens} tokens), {batch_size} pairs a batch "
        f"at the longest, {torch.get_num_threads()} threads"
    )
    for column in ("way", "batches", "seconds", "tokens/s", "× transformers", "max |Δ log p| to duet"):
        table.add_column(column, justify="left" if column == "way" else "right")
    base = results["transformers"]["tokens_per_second"]
    for name, row in results.items():
        difference = row.get("max_abs_logp_difference_to_duet")
        table.add_row(
            name,
            str(row["batches"]),
            f"{row['seconds']:.2f}",
            f"{row['tokens_per_second']:.0f}",
            f"{row['tokens_per_second'] / base:.2f}",
            "-" if difference is None else f"{difference:.1e}",
        )
    Console().print(table)
    if args.json:
        write_json(args.json, {"pairs": len(pairs), "tokens": tokens, "threads": torch.get_num_threads(), **results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
