"""`python -m bench.generation`: sampled tokens per second of Duet's generation against transformers'
``generate`` on the same model, prompts and settings, at several batch sizes, in one process.

    python -m bench.generation --model smollm2-135m-instruct --batches 1,4,8,16 --tokens 128

Every row of a batch generates exactly ``--tokens`` tokens (end-of-turn is not a stop here, so both sides do
the same work); the prompts are the held-out prompts of the SmolLM2 recipe, repeated to fill the batch.
Aggregate tokens/s = batch × tokens / seconds. Each measurement is the median of ``--repeats`` runs.

``--backend mlx`` measures the MLX backend instead: its batched decode (mlx-lm's BatchGenerator, every row
with its own seed) against the same rows sampled one at a time with mlx-lm's ``generate_step`` (how the
backend generated before it batched), and counts the rows whose answers are the same both ways.

    python -m bench.generation --backend mlx --model models/demo/tiny-chat --batches 1,4,8 --tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from app.api import ChatTokenizer, create_backend, read_prompts, resolve_config, resolve_model
from core.atomic import write_json

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


def measure_mlx(backend, chat, batch: int, tokens: int, repeats: int) -> dict[str, float]:
    prompts = _prompt_ids(chat, batch)
    batched, alone, prefill, same = [], [], [], 0
    for repeat in range(repeats):
        seeds = list(range(repeat, repeat + batch))
        started = time.perf_counter()  # the prefill and one token: what the decoding rate leaves out
        backend.generate(prompts, max_new_tokens=1, temperature=1.0, seeds=seeds, stop_ids=[])
        prefill.append(time.perf_counter() - started)
        started = time.perf_counter()
        out = backend.generate(prompts, max_new_tokens=tokens, temperature=1.0, seeds=seeds, stop_ids=[])
        batched.append(time.perf_counter() - started)
        assert all(len(o) == tokens for o in out)
        backend.batched_generation = False  # the backend's row-by-row path: mlx-lm's generate_step per row
        started = time.perf_counter()
        one_by_one = backend.generate(prompts, max_new_tokens=tokens, temperature=1.0, seeds=seeds, stop_ids=[])
        alone.append(time.perf_counter() - started)
        backend.batched_generation = True
        same += sum(a == b for a, b in zip(out, one_by_one, strict=True))
    batched_s, alone_s, prefill_s = statistics.median(batched), statistics.median(alone), statistics.median(prefill)
    return {
        "batch": batch,
        "tokens": tokens,
        "duet_tokens_per_s": batch * tokens / batched_s,
        "prefill_s": prefill_s,
        "decode_tokens_per_s": batch * (tokens - 1) / max(batched_s - prefill_s, 1e-9),
        "one_by_one_tokens_per_s": batch * tokens / alone_s,
        "speedup": alone_s / batched_s,
        "same_answers": same / (batch * repeats),
    }


def _torch_table(args, backend, rows: list[dict[str, float]]) -> Table:
    import torch

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
    return table


def _mlx_table(args, backend, rows: list[dict[str, float]]) -> Table:
    info = backend.info()
    table = Table(title=f"{args.model}: MLX ({info.device}, {info.dtype}) sampled tokens/s, {args.tokens} tokens a row")
    columns = ("batch", "batched tok/s", "prefill s", "decoding tok/s", "one by one tok/s", "batched / one by one")
    for column in (*columns, "same answers"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["batch"]),
            f"{row['duet_tokens_per_s']:.1f}",
            f"{row['prefill_s']:.2f}",
            f"{row['decode_tokens_per_s']:.1f}",
            f"{row['one_by_one_tokens_per_s']:.1f}",
            f"{row['speedup']:.2f}×",
            f"{row['same_answers']:.0%}",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "float32", "bfloat16"], help="sampling.precision (Duet's side)"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.threads and args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    overrides = [f"model.path={args.model}", f"model.backend={args.backend}"]
    if args.backend == "torch":
        overrides.append(f"sampling.precision={args.precision}")
    config = resolve_config(None, overrides)
    backend = create_backend(config)
    backend.load_model(resolve_model(config.model.path), trust_remote_code=False)
    backend.attach_lora(config.lora)
    chat = ChatTokenizer(backend.tokenizer, config.data.chat_template)
    measure_one = measure_mlx if args.backend == "mlx" else measure
    rows = [measure_one(backend, chat, int(b), args.tokens, args.repeats) for b in args.batches.split(",")]
    Console().print((_mlx_table if args.backend == "mlx" else _torch_table)(args, backend, rows))
    if args.json:
        write_json(args.json, rows)  # atomically: an interrupted run never leaves half a results file
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
