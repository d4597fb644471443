"""`duet bench` / `python -m bench`: run each variant in its own process, alternating, and print a table."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

from rich.console import Console
from rich.table import Table

from bench.workloads import WORKLOADS

GIB = 1024**3


def measure(workload: str, variant: str, steps: int, device: str, dtype: str) -> dict:
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
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"variant": variant, "error": f"exit {result.returncode}: {tail[0]}"}


def table(workload: str, rows: list[dict]) -> Table:
    view = Table(title=f"{workload}: {WORKLOADS[workload].description}", title_justify="left")
    for column in (
        "variant",
        "device",
        "s/step (median)",
        "tokens/s",
        "pairs/s",
        "peak memory",
        "Δ over model",
        "first loss",
        "reference pass",
    ):
        view.add_column(column, justify="right" if column != "variant" else "left")
    for row in rows:
        if "error" in row:
            view.add_row(row["variant"], "", row["error"])
            continue
        peak = row.get("peak_device", row["peak_resident"])
        delta = "" if "peak_device" in row else f"{(row['peak_resident'] - row['resident_before_steps']) / GIB:.2f} GiB"
        view.add_row(
            row["variant"],
            row["device"],
            f"{row['seconds_per_step']:.3f}",
            f"{row['tokens_per_second']:.0f}",
            f"{row['pairs_per_second']:.2f}",
            f"{peak / GIB:.2f} GiB",
            delta,
            f"{row['first_loss']:.5f}",
            f"{row['reference_seconds']:.1f} s",
        )
    return view


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="duet bench", description=__doc__)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="qwen-small")
    parser.add_argument("--variants", default="torch-chunked,torch-naive")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds over the variants")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", help="also write every measurement to this file")
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:  # a log file: wide enough for the table
        console = Console(width=200)
    console.print(
        f"machine: {platform.processor() or platform.machine()}, {platform.system()}, python "
        f"{platform.python_version()}"
    )
    rows = []
    for _ in range(args.repeats):
        for variant in args.variants.split(","):
            rows.append(measure(args.workload, variant, args.steps, args.device, args.dtype))
            console.print(f"  measured {variant}: {rows[-1].get('seconds_per_step', rows[-1].get('error'))}")
    console.print(table(args.workload, rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"workload": args.workload, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
