"""`python -m bench.profile_step`: where a Duet training step's time goes, by kind of operator.

    python -m bench.profile_step --workload smollm2-135m --steps 2

The workload's pairs, reference pass and steps as `duet bench` runs them (duet-torch, or the variant named by
``--variant``; ``--dtype bfloat16`` for bf16 under autocast), the first step as a warm-up, then ``--steps``
steps under ``torch.profiler``. Each operator's own CPU time (not counting the operators it calls) is put in
one group: matrix products, attention, the softmax / log-softmax of the log-prob kernel, normalization,
element-wise arithmetic, the optimizer, copies and layout, autograd's
bookkeeping; what no operator accounts for is Python and the framework around them.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from bench.workloads import WORKLOADS

# (group, words in an operator's name) in the order they are tried: the first match wins
GROUPS = (
    ("optimizer (AdamW)", ("_foreach", "adam", "lerp", "addcdiv", "addcmul")),
    ("attention", ("attention", "sdpa", "_flash", "baddbmm", "bmm")),
    ("matrix products", ("mm", "matmul", "linear", "addmm")),
    ("softmax / log-softmax", ("softmax", "logsumexp", "gather")),
    ("normalization", ("norm", "rsqrt", "pow", "mean")),
    ("activations", ("silu", "sigmoid", "gelu")),
    (
        "copies and layout",
        (
            "copy",
            "to",
            "cat",
            "contiguous",
            "clone",
            "view",
            "reshape",
            "transpose",
            "permute",
            "index",
            "select",
            "slice",
            "expand",
            "empty",
            "zeros",
            "fill",
            "stack",
            "narrow",
        ),
    ),
    ("element-wise", ("add", "mul", "sub", "div", "neg", "exp", "log", "where", "masked", "sum", "cos", "sin")),
    ("autograd bookkeeping", ("backward", "autograd", "accumulate")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, words in GROUPS:
        if any(word in lowered for word in words):
            return group
    return "other operators"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="smollm2-135m", choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=2, help="steps profiled after one warm-up step")
    parser.add_argument(
        "--variant",
        default="duet-torch",
        help="a duet-torch bench variant (duet-torch-gc: with gradient checkpointing; duet-torch-peft-lora: "
        "PEFT's own LoRA forward)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from app.api import ChatTokenizer, build_objective
    from bench.worker import VARIANTS, duet_config, make_backend, workload_pairs
    from core.reference import compute_reference
    from core.schedule import learning_rate
    from core.tokenization import tokenize_pairs
    from core.trainer import TrainData, micro_batches, optimizer_step

    workload = WORKLOADS[args.workload]
    if not args.variant.startswith("duet-torch") or args.variant not in VARIANTS:
        parser.error(f"--variant {args.variant}: not a duet-torch variant of the bench")
    variant = VARIANTS[args.variant]
    config = duet_config(workload, variant, args.steps + 1, "cpu", args.dtype)
    backend = make_backend(config, variant)
    chat = ChatTokenizer(backend.tokenizer)
    pairs, _ = tokenize_pairs(
        workload_pairs(workload), chat, max_length=workload.max_length, max_prompt_length=workload.max_prompt_length
    )
    reference = compute_reference(
        backend, pairs, batch_size=2 * config.train.batch_size, pad_id=chat.pad_id, adapter=False
    )
    data = TrainData(pairs, [], reference, None, chat.pad_id, 1)
    objective = build_objective(config.objective)
    stream = micro_batches(data, config, 0, 0)
    lr = learning_rate(0, total_steps=args.steps + 1, peak=config.train.lr, warmup=0, kind=config.train.schedule)
    optimizer_step(backend, objective, data, config, stream, lr)  # warm-up: allocators, first-call paths

    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.steps):
            optimizer_step(backend, objective, data, config, stream, lr)
    wall = time.perf_counter() - started

    seconds: dict[str, float] = defaultdict(float)
    top: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for event in profiler.key_averages():
        own = event.self_cpu_time_total / 1e6
        group = group_of(event.key)
        seconds[group] += own
        top[group].append((own, event.key))
    # the profiler's own overhead inflates the wall time a little; "outside operators" is what is left
    seconds["outside operators (Python, dispatch)"] = max(0.0, wall - sum(seconds.values()))

    table = Table(
        title=f"{args.workload}, {args.variant}, {args.dtype}: {args.steps} Duet steps profiled, {wall:.1f} s wall "
        f"({wall / args.steps:.2f} s a step, {torch.get_num_threads()} threads, under the profiler)"
    )
    for column in ("group", "seconds", "share", "largest operators"):
        table.add_column(column, justify="right" if column in ("seconds", "share") else "left")
    for group, value in sorted(seconds.items(), key=lambda item: -item[1]):
        largest = ", ".join(name for _, name in sorted(top.get(group, []), reverse=True)[:3])
        table.add_row(group, f"{value:.2f}", f"{value / wall:.1%}", largest)
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
