"""`duet bench` / `python -m bench`: each variant in its own process, alternating, then one table.

    duet bench --workload qwen-small --variants duet-torch,trl,trl-precompute --steps 16

Variants: duet-torch (add -gc for gradient checkpointing, -unshared to compute each prompt twice, -naive
for full logits, -peft-lora for PEFT's own LoRA forward instead of Duet's fused one, -bf16 and -bf16-gc for
bf16 weights under autocast, on a CPU too), duet-mlx (-gc, -unshared), trl (TRL's DPOTrainer with a PEFT
LoRA config, its defaults), trl-precompute (precompute_ref_log_probs=True), trl-bf16 (bf16=True), trl-liger
(TRL with use_liger_kernel=True: CUDA and the liger-kernel package; reported as unavailable without them).
TRL comes with the `bench` extra. On a GPU that bench/flops.py knows (or with --peak-tflops), each row also
gets its MFU; on the CPU, against this machine's own GEMM speed in the row's dtype. Thread variants:
duet-torch takes model.threads=auto (OMP_NUM_THREADS in the environment wins over auto), duet-torch-threads1
one thread, duet-torch-threads-torch torch's own default (one a core). --background-load N runs N spinning
processes beside every variant, for how it fares on a busy machine; with --load-from-step K they start when
step K begins, a load that arrives during the run (Duet variants only).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.background import background_load, describe
from bench.flops import add_cpu_mfu, add_mfu, run_flops
from bench.worker import chunk_setting
from bench.workloads import WORKLOADS
from core.atomic import write_json

GIB = 1024**3


def measure(
    workload: str,
    variant: str,
    steps: int,
    device: str,
    dtype: str,
    chunk: int | str,
    pairs: int | None,
    timeout: float | None = None,
    late_load: tuple[int, int] | None = None,
) -> dict:
    command = [
        sys.executable,
        "-m",
        "bench.worker",
        "--workload",
        workload,
        "--variant",
        variant,
        "--steps",
        str(steps),
        "--device",
        device,
        "--dtype",
        dtype,
        "--chunk",
        str(chunk),
    ]
    if pairs:
        command += ["--pairs", str(pairs)]
    if late_load:  # the worker starts the spinners itself, when that step begins
        command += ["--late-load", str(late_load[0]), "--load-from-step", str(late_load[1])]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout:.0f} s"}
    for line in result.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"variant": variant, "error": f"exit {result.returncode}: {tail[0]}"}


def merge(rows: list[dict]) -> list[dict]:
    """One row per variant: medians over the repeated runs."""
    merged: dict[str, dict] = {}
    for row in rows:
        if "error" in row:
            merged.setdefault(row["variant"], row)
            continue
        merged.setdefault(row["variant"], {**row, "runs": []})["runs"].append(row)
    for row in merged.values():
        runs = row.pop("runs", None)
        if runs:
            for key in (
                "seconds_per_step",
                "total_seconds",
                "reference_seconds",
                "pairs_per_second",
                "peak_resident",
                "peak_device",
                "tokens_per_second",
                "tokens_per_second_loaded",
            ):
                values = [r[key] for r in runs if r.get(key) is not None]
                if values:
                    row[key] = statistics.median(values)
            row["repeats"] = len(runs)
    return list(merged.values())


def peak(row: dict) -> float:
    return row.get("peak_device") or row["peak_resident"]


def table(workload: str, rows: list[dict], load: int = 0, from_step: int | None = None) -> Table:
    title = f"{workload}: {WORKLOADS[workload].description}; background load: {describe(load, from_step)}"
    view = Table(title=title, title_justify="left")
    steps = max((len(r["losses"]) for r in rows if "error" not in r), default=0)
    loss_steps = sorted({1, 2, steps} & set(range(1, steps + 1)))  # the first two and the last, once each
    columns = ["variant", "device", "threads", "s/step (median)", "total s (prep+ref+steps)", "reference s"]
    columns += ["pairs/s", "tokens/s"]
    loaded = [r.get("load_from_step") for r in rows if r.get("load_from_step")]
    columns += [f"tokens/s from step {loaded[0]} (loaded)", "thread moves"] if loaded else []
    mfu = any(r.get("mfu") for r in rows)
    columns += ["peak memory"] + (["MFU", "step MFU"] if mfu else []) + [f"loss {step}" for step in loss_steps]
    for column in columns:
        view.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        if "error" in row:
            view.add_row(row["variant"], "", escape(row["error"]))
            continue
        losses = row["losses"]
        view.add_row(
            row["variant"],
            row["device"],
            str(row.get("threads") or "-"),
            f"{row['seconds_per_step']:.2f}",
            f"{row['total_seconds']:.1f}",
            f"{row['reference_seconds']:.1f}",
            f"{row['pairs_per_second']:.3f}",
            f"{row['tokens_per_second']:.0f}" if row.get("tokens_per_second") else "-",
            *(_loaded_columns(row) if loaded else []),
            f"{peak(row) / GIB:.2f} GiB",
            *([_share(row.get("mfu")), _share(row.get("step_mfu"))] if mfu else []),
            *(f"{losses[step - 1]:.5f}" if step <= len(losses) else "-" for step in loss_steps),
        )
    return view


def _loaded_columns(row: dict) -> list[str]:
    rate = row.get("tokens_per_second_loaded")
    moves = ", ".join(f"{m['threads']} at step {m['step']}" for m in row.get("thread_moves", [])) or "-"
    return [f"{rate:.0f}" if rate else "-", moves]


def _share(value: float | None) -> str:
    return f"{value:.1%}" if value else "-"


def comparisons(rows: list[dict]) -> list[str]:
    """Duet against each TRL variant: ratios from this run, and how closely the losses agree."""
    good = {r["variant"]: r for r in rows if "error" not in r}
    lines = []
    for duet in (v for v in good if v.startswith("duet")):
        for peer in (v for v in good if v.startswith("trl")):
            d, t = good[duet], good[peer]
            lines.append(
                f"{duet} / {peer}: time per step {d['seconds_per_step'] / t['seconds_per_step']:.3f}, "
                f"total wall time {d['total_seconds'] / t['total_seconds']:.3f}, "
                f"pairs/s {d['pairs_per_second'] / t['pairs_per_second']:.2f}×, "
                f"peak memory {peak(d) / peak(t):.3f}"
            )
            steps = min(len(d["losses"]), len(t["losses"]))
            gaps = [abs(a - b) for a, b in zip(d["losses"][:steps], t["losses"][:steps], strict=True)]
            if gaps:
                lines.append(
                    f"    loss agreement: step 1 |Δ| {gaps[0]:.2e}"
                    + (f", step 2 |Δ| {gaps[1]:.2e}" if steps > 1 else "")
                    + f", largest over {steps} steps {max(gaps):.2e}"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="duet bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="qwen-small")
    parser.add_argument("--variants", default="duet-torch,trl,trl-precompute")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds over the variants")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--chunk", type=chunk_setting, default="auto", help="Duet's model.logprob_chunk_size (a number or auto)"
    )
    parser.add_argument("--pairs", type=int, help="use only the first N pairs of the workload (slow backends)")
    parser.add_argument("--json", help="also write every measurement to this file")
    parser.add_argument("--timeout", type=float, help="seconds one variant's measurement may take (default: no limit)")
    parser.add_argument(
        "--background-load",
        type=int,
        default=0,
        metavar="N",
        help="run N spinning processes (one busy core each) beside every variant while it is measured",
    )
    parser.add_argument(
        "--load-from-step",
        type=int,
        metavar="K",
        help="start the --background-load processes when step K begins, not before the model loads (a load that "
        "arrives during a run; Duet variants only)",
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU (default: bench/flops.py's table)"
    )
    args = parser.parse_args(argv)
    if args.load_from_step is not None and (args.load_from_step < 1 or args.background_load < 1):
        parser.error("--load-from-step K needs K >= 1 and --background-load N with N >= 1")
    console = Console()
    if not console.is_terminal:  # a log file: wide enough for the table
        console = Console(width=220)
    console.print(
        f"machine: {platform.processor() or platform.machine()}, {platform.system()}, python "
        f"{platform.python_version()}; workload {args.workload}, {args.steps} steps, "
        f"{args.repeats} round(s); background load: {describe(args.background_load, args.load_from_step)}",
        highlight=False,
    )
    rows = []
    for _ in range(args.repeats):
        for variant in args.variants.split(","):
            late = (args.background_load, args.load_from_step) if args.load_from_step else None
            # started afresh for each variant, stopped after it (or by the worker, at a step)
            with background_load(0 if late else args.background_load):
                rows.append(
                    measure(
                        args.workload,
                        variant,
                        args.steps,
                        args.device,
                        args.dtype,
                        args.chunk,
                        args.pairs,
                        args.timeout,
                        late,
                    )
                )
            shown = rows[-1].get("error") or f"{rows[-1]['seconds_per_step']:.2f} s/step"
            console.print(f"  measured {variant}: {shown}", highlight=False, markup=False)
    merged = merge(rows)
    if any(r.get("gpu") for r in merged) or args.peak_tflops:
        add_mfu(merged, run_flops(WORKLOADS[args.workload], args.steps, args.pairs), args.peak_tflops)
    elif merged and all(r.get("device") == "cpu" for r in merged if "error" not in r):  # this machine's own
        # matrix-product speed, measured now (idle), is the CPU's peak
        add_cpu_mfu(merged, run_flops(WORKLOADS[args.workload], args.steps, args.pairs))
    console.print(table(args.workload, merged, args.background_load, args.load_from_step))
    for line in comparisons(merged):
        console.print(line, highlight=False)
    if args.json:  # atomically: an interrupted benchmark never leaves half a results file
        results = {
            "workload": args.workload,
            "steps": args.steps,
            "background_load": args.background_load,
            "load_from_step": args.load_from_step,
        }
        write_json(args.json, {**results, "rows": rows, "merged": merged})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
