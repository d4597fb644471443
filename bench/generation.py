"""`python -m bench.generation`: sampled tokens per second of Duet's generation against transformers'
``generate`` on the same model, prompts and settings, at several batch sizes, in one process.

    python -m bench.generation --model smollm2-135m-instruct --batches 1,4,8,16 --tokens 128

Every row of a batch generates exactly ``--tokens`` tokens (end-of-turn is not a stop here, so both sides do
the same work); the prompts are the held-out prompts of the SmolLM2 recipe, repeated to fill the batch.
Aggregate tokens/s = batch × tokens / seconds. Each measurement is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from app.api import ChatTokenizer, create_backend, read_prompts, resolve_config, resolve_model

PROMPTS = Path(__file__).resolve().parents[1] / "models" / "smollm2" / "eval.json"


def _prompt_ids(chat, count: int) -> list[list[int]]:
    single = [p for p in read_prompts(PROMPTS) if len(p.messages) == 1]
    return [chat.prompt_ids(single[i % len(single)].conversation) for i in range(count)]


def measure(backend, chat, batch: int, tokens: int, repeats: int) -> dict[str, float]:
    import torch

    prompts = _prompt_ids(chat, batch)
    duet, hf = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        out = backend.generate(
            prompts, max_new_tokens=tokens, temperature=1.0, seeds=list(range(repeat, repeat + batch)), stop_ids=[]
        )
        duet.append(time.perf_counter() - started)
        assert all(len(o) == tokens for o in out)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[chat.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        torch.manual_seed(repeat)
        started = time.perf_counter()
        with torch.inference_mode():
            hf_out = backend.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=chat.pad_id,
            )
        hf.append(time.perf_counter() - started)
        assert hf_out.shape[1] == width + tokens
    duet_s, hf_s = statistics.median(duet), statistics.median(hf)
    return {
        "batch": batch,
        "tokens": tokens,
        "duet_tokens_per_s": batch * tokens / duet_s,
        "transformers_tokens_per_s": batch * tokens / hf_s,
        "speedup": hf_s / duet_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "float32", "bfloat16"], help="sampling.precision (Duet's side)"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"model.path={args.model}", "model.backend=torch", f"sampling.precision={args.precision}"]
    config = resolve_config(None, overrides)
    backend = create_backend(config)
    backend.load_model(resolve_model(config.model.path), trust_remote_code=False)
    backend.attach_lora(config.lora)
    chat = ChatTokenizer(backend.tokenizer, config.data.chat_template)
    rows = [measure(backend, chat, int(b), args.tokens, args.repeats) for b in args.batches.split(",")]
    table = Table(
        title=f"{args.model}: sampled tokens/s, {args.tokens} tokens a row, {torch.get_num_threads()} threads, "
        f"Duet in {backend.generation_dtype} (sampling.precision={args.precision}), transformers in float32"
    )
    for column in ("batch", "Duet tok/s", "transformers generate tok/s", "Duet / transformers"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["batch"]),
            f"{row['duet_tokens_per_s']:.1f}",
            f"{row['transformers_tokens_per_s']:.1f}",
            f"{row['speedup']:.2f}×",
        )
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
