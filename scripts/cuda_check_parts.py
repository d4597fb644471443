"""Helpers of scripts/cuda_check.sh: each part's figures as JSON, and one summary of all parts.

python scripts/cuda_check_parts.py record PARTS NAME RC SECONDS NOTE [FIGURES.json]
python scripts/cuda_check_parts.py run-figures RUN_ROOT OUT.json     (a core.run run: its metrics.jsonl)
python scripts/cuda_check_parts.py junit JUNIT.xml OUT.json          (a pytest run)
python scripts/cuda_check_parts.py has-workload NAME                 (exit 0 when bench has it and its model is here)
python scripts/cuda_check_parts.py summary PARTS OUT.json
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

TIMED_OUT = (124, 137)  # timeout(1): the command ran past its limit (137: killed after the grace period)


def status(rc: int, note: str) -> str:
    if note.startswith("skipped"):
        return "skipped"
    if rc in TIMED_OUT:
        return "timed out"
    return "passed" if rc == 0 else "failed"


def record(parts: Path, name: str, rc: int, seconds: float, note: str, figures: Path | None) -> None:
    data: Any = None
    if figures is not None and figures.is_file():
        try:
            data = json.loads(figures.read_text())
        except ValueError as exc:
            data = {"unreadable": str(exc)}
    entry = {"part": name, "status": status(rc, note), "exit_code": rc, "seconds": seconds, "note": note}
    rows = data.get("merged") if isinstance(data, dict) else None
    if entry["status"] == "passed" and rows is not None and all("error" in row for row in rows):
        entry["status"] = "failed"  # a bench whose every variant failed measured nothing
    parts.mkdir(parents=True, exist_ok=True)
    (parts / f"{name}.json").write_text(json.dumps({**entry, "figures": data}, indent=1))
    print(f"[cuda_check] {name}: {entry['status']} (exit {rc}, {seconds:.0f} s){' - ' + note if note else ''}")


def run_figures(root: Path, out: Path) -> None:
    """What a core.run run reports: device, dtype, processes, steps, final metrics, speed and memory."""
    files = sorted(root.rglob("metrics.jsonl"))
    if not files:
        out.write_text(json.dumps({"error": f"no metrics.jsonl under {root}"}))
        return
    events = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    start = next((e for e in events if e.get("type") == "start"), {})
    end = next((e for e in reversed(events) if e.get("type") == "end"), {})
    train = [e for e in events if e.get("type") == "train"]
    last = train[-1] if train else {}
    figures = {
        "metrics_file": str(files[-1]),
        **{k: start.get(k) for k in ("backend", "device", "dtype", "world_size", "total_steps")},
        "finished": bool(end),
        "steps": end.get("step", last.get("step")),
        "final": end.get("final"),
        "last_train": {k: v for k, v in last.items() if k != "message"},
    }
    # under torchrun the start message names the process count (", 1 process"): the process group was formed
    figures["process_group"] = "process" in str(start.get("message", ""))
    out.write_text(json.dumps(figures, indent=1))


def junit(path: Path, out: Path) -> None:
    if not path.is_file():
        out.write_text(json.dumps({"error": f"pytest wrote no {path.name}"}))
        return
    cases = ET.parse(path).getroot().iter("testcase")
    outcome: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        outcome["skipped" if kind == "skipped" else "failed" if kind in ("failure", "error") else "passed"].append(name)
    counts = {key: len(names) for key, names in outcome.items()}
    out.write_text(json.dumps({**counts, "failed_tests": outcome["failed"], "skipped_tests": outcome["skipped"]}))


def has_workload(name: str) -> int:
    """0 when bench has the workload and its model is available on this machine (a real model's weights may
    be too large to travel to a GPU machine that reaches no registry)."""
    from bench.workloads import WORKLOADS
    from models.registry import RECOMMENDED, availability

    if name not in WORKLOADS:
        return 1
    model = RECOMMENDED.get(WORKLOADS[name].model or "")
    if model is not None and availability(model) != "ready":
        print(f"{name}: {availability(model)}", file=sys.stderr)
        return 1
    return 0


def summary(parts: Path, out: Path) -> None:
    entries = [json.loads(p.read_text()) for p in sorted(parts.glob("*.json"), key=lambda p: p.stat().st_mtime)]
    out.write_text(json.dumps({"parts": entries}, indent=1))
    for entry in entries:
        print(f"[cuda_check] {entry['part']:<14} {entry['status']:<10} {entry['seconds']:>5.0f} s  {entry['note']}")


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "record":
        figures = Path(args[5]) if len(args) > 5 and args[5] else None
        record(Path(args[0]), args[1], int(args[2]), float(args[3]), args[4], figures)
    elif command == "run-figures":
        run_figures(Path(args[0]), Path(args[1]))
    elif command == "junit":
        junit(Path(args[0]), Path(args[1]))
    elif command == "has-workload":
        return has_workload(args[0])
    elif command == "summary":
        summary(Path(args[0]), Path(args[1]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.workloads, run from anywhere
    raise SystemExit(main(sys.argv[1:]))
