"""`python -m bench.collect_latency`: how long a person judging in the Collect screen waits for each pair.

    python -m bench.collect_latency --model smollm2-135m-instruct --pairs 20 --think 5

A simulated person takes ``--think`` seconds over each pair once both answers are on screen, then judges it;
the session meanwhile generates the next pairs in the background, as in the screen. Reported: the seconds
each pair showed "generating" after the previous judgement (the first pair includes the first generation),
and their median after the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from app.api import open_session, read_prompts, resolve_config

PROMPTS = Path(__file__).resolve().parents[1] / "models" / "smollm2" / "train.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.collect_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--think", type=float, default=5.0, help="seconds the person takes over a pair")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--ahead", type=int, default=4, help="pairs generated ahead of the one on screen")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    single = [p for p in read_prompts(PROMPTS) if len(p.messages) == 1][: args.pairs]
    folder = Path(tempfile.mkdtemp(prefix="duet-latency-"))
    (folder / "prompts.jsonl").write_text(
        "".join(json.dumps({"messages": p.conversation}) + "\n" for p in single), encoding="utf-8"
    )
    config = resolve_config(
        None, [f"model.path={args.model}", "model.backend=torch", f"sampling.max_new_tokens={args.max_new_tokens}"]
    )
    loading = time.perf_counter()
    session = open_session(config, str(folder / "prompts.jsonl"), folder / "judged.jsonl", ahead=args.ahead)
    print(f"model loaded in {time.perf_counter() - loading:.1f} s", flush=True)
    session.start()
    waits = []
    try:
        for number in range(1, len(single) + 1):
            asked = time.perf_counter()
            while True:
                answers = session.current()
                if answers is not None and answers.done:
                    break
                time.sleep(0.02)
            waits.append(time.perf_counter() - asked)
            tokens = sum(len(t) for t in answers.token_ids)
            print(f"pair {number}: waited {waits[-1]:.2f} s ({tokens} tokens)", flush=True)
            time.sleep(args.think)
            session.judge("a")
    finally:
        session.close()
    after_first = waits[1:]
    figures = {
        "model": args.model,
        "pairs": len(waits),
        "think_seconds": args.think,
        "max_new_tokens": args.max_new_tokens,
        "ahead": args.ahead,
        "first_wait": waits[0],
        "median_wait_after_first": statistics.median(after_first) if after_first else None,
        "max_wait_after_first": max(after_first) if after_first else None,
        "waits": waits,
    }
    print(
        f"first pair {waits[0]:.1f} s; after it: median {figures['median_wait_after_first']:.2f} s, "
        f"max {figures['max_wait_after_first']:.2f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
