"""The ``duet`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.text import Text

from core.errors import DuetError


def _inspect(args: argparse.Namespace) -> int:
    from core.inspection import run_inspect

    columns = dict(_key_value(item, "--column") for item in args.column)
    return run_inspect(
        args.data,
        args.model,
        console=Console(soft_wrap=True),
        skip_invalid=args.skip_invalid,
        format=args.format,
        columns=columns,
        split=args.split,
        chat_template=args.chat_template,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length or None,
        show=args.show,
        full=args.full,
        batch_size=args.batch_size,
        trust_remote_code=args.trust_remote_code,
    )


def _export(args: argparse.Namespace) -> int:
    from app.exports import export_run
    from core.metrics import ConsoleReporter

    reporter = ConsoleReporter(Console(soft_wrap=True))
    try:
        result = export_run(args.source, args.to, args.out, base_model=args.base_model, force=args.force, emit=reporter)
    finally:
        reporter.close()
    text = f"wrote the {args.to} export of {result.source.describe()} to {result.out}"
    Console(soft_wrap=True).print(text, highlight=False, markup=False)  # soft wrap: paths stay whole
    return 0


def _tui(config: str | None = None, watch: str | None = None, resume: str | None = None, wait: bool = False) -> int:
    from tui.app import run_app

    return run_app(config, watch=watch, resume=resume, wait=wait)


def _collect(args: argparse.Namespace) -> int:
    """``duet collect PROMPTS --out FILE``: the Collect screen (``--thumbs``: one answer at a time, rated up or
    down), or with ``--judge`` a rule or model judging."""
    from app.settings import resolve_config

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.adapter:
        overrides.append(f"model.adapter={args.adapter}")
    if args.judge:
        kind, _, target = args.judge.partition(":")
        if kind not in ("human", "rule", "model") or (kind != "human" and not target):
            raise DuetError(f"--judge {args.judge!r}: give human, rule:path/to/rules.py or model:path/to/model.")
        overrides.append(f"judge.kind={kind}")
        if target:
            overrides.append(f"judge.{kind}={target}")
    config = resolve_config(args.config, overrides)
    if args.thumbs and config.judge.kind != "human":
        raise DuetError(
            "--thumbs is a person rating answers in the Collect screen; a rule or model judge compares pairs "
            "(drop --judge, or drop --thumbs)."
        )
    if config.judge.kind == "human":
        from tui.app import run_app

        _check_out_file(args.out, thumbs=args.thumbs)
        return run_app(collect=(config, args.prompts, args.out), thumbs=args.thumbs)
    return _collect_with_judge(config, args.prompts, args.out, args.samples)


def _check_out_file(out: str, *, thumbs: bool) -> None:
    """A judgements file of the other kind (pairs for --thumbs, or thumbs without it) is said here, before the
    screen opens and the model loads, not on a screen that can do nothing else."""
    from core.collect import PAIRS, THUMBS, JudgementsFile

    if Path(out).expanduser().is_file():
        JudgementsFile(out, mode=THUMBS if thumbs else PAIRS).close()


def collect_parser() -> argparse.ArgumentParser:
    collect = argparse.ArgumentParser(
        prog="duet collect",
        description="Sample two answers per prompt from your model and judge them (you in the Collect screen, a "
        "rule or a model) into a judgements file that trains as it is (data.train: FILE).",
    )
    collect.add_argument(
        "prompts", nargs="?", help="prompts: a text file (one per line), JSON lines, or a preference file"
    )
    collect.add_argument("--out", required=True, help="the judgements file (JSON lines); reopened, it resumes")
    collect.add_argument("--model", help="the model to sample from (default: the config's model.path)")
    collect.add_argument("--adapter", help="sample with this adapter on (a run's adapter folder)")
    collect.add_argument("--config", help="a run config whose model, sampling and judge sections to use")
    collect.add_argument("--judge", help="human (the Collect screen, default), rule:FILE.py[:function] or model:PATH")
    collect.add_argument("--samples", type=int, default=2, help="answers per prompt for a rule or model judge")
    collect.add_argument(
        "--thumbs",
        action="store_true",
        help="one answer at a time, rated thumbs up or down: unpaired feedback for objective.name=kto",
    )
    collect.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. sampling.temperature=0.8")

    return collect


def _collect_main(argv: list[str]) -> int:
    args = collect_parser().parse_intermixed_args(argv)  # key=value overrides may follow the options
    try:
        return _collect(args)
    except DuetError as exc:
        Console(stderr=True, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
        return exc.exit_code


def _collect_with_judge(config, prompts: str | None, out: str, samples: int) -> int:
    from app.collect import build_judge, collect_with_judge, judge_model_loader, load_sampler, open_prompts
    from core.collect import JudgementsFile

    console = Console(soft_wrap=True)
    items = open_prompts(prompts)
    judge = build_judge(config.judge, judge_model_loader(config))
    sampler = load_sampler(config, adapter=config.model.adapter, use_adapter=True)
    with JudgementsFile(out) as file:
        before = len(file.records)
        if before:
            console.print(f"{out}: {before} judgements already there; going on with the prompts not judged yet")

        def progress(done: int, total: int) -> None:
            console.print(f"  {done}/{total} judged", highlight=False)

        counts = collect_with_judge(sampler, items, file, judge, config, samples=samples, progress=progress)
    stats = judge.stats
    consistency = "" if stats.consistency is None else f", both orders agreed on {stats.consistency:.0%}"
    no_verdict = f", {stats.no_verdict} answers without a verdict (ties)" if stats.no_verdict else ""
    console.print(
        f"{judge.name}: {counts['a'] + counts['b']} preferences, {counts['tie']} ties{consistency}{no_verdict}; "
        f"written to {out} (train on it: python -m core.run data.train={out})",
        highlight=False,
    )
    return 0


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duet eval",
        description="What training changed: the tuned model against its base on held-out prompts (a judge's win "
        "rate with its interval, the win rate at equal length, KL from the base, lengths, degeneration), "
        "written to RUN/eval (eval.json, eval.md, charts).",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="a run folder, a checkpoint or an adapter folder; key=value overrides may follow (evaluation.samples=4)",
    )
    parser.add_argument("--prompts", help="held-out prompts (a text or JSON lines file); default: the run's eval split")
    parser.add_argument("--base", help="compare against this run or adapter instead of the base model alone")
    parser.add_argument("--judge", help="rule:FILE.py[:function] or model:PATH (default: the run's judge section)")
    parser.add_argument("--checkpoints", action="store_true", help="also evaluate every checkpoint the run kept")
    parser.add_argument("--compare", action="store_true", help="put the runs' reports side by side (no new evaluation)")
    parser.add_argument("--out", help="write the report here instead of RUN/eval")
    parser.add_argument("--tui", action="store_true", help="run it in the terminal UI's Eval screen")
    parser.add_argument("--blind", action="store_true", help="judge tuned against base yourself, blind (terminal UI)")
    return parser


def _eval_main(argv: list[str]) -> int:
    args = eval_parser().parse_intermixed_args(argv)
    # runs and key=value overrides share the positionals: an override has "=" and is not a path
    args.overrides = [r for r in args.runs if "=" in r and not Path(r).exists()]
    args.runs = [r for r in args.runs if r not in args.overrides]
    if not args.runs:
        eval_parser().error("give a run folder (RUN) to evaluate")
    try:
        return _eval(args)
    except DuetError as exc:
        Console(stderr=True, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
        return exc.exit_code


def _eval(args: argparse.Namespace) -> int:
    from app.evaluate import compare, evaluate, headline
    from core.events import Info
    from core.metrics import ConsoleReporter

    console = Console(soft_wrap=True)
    if args.compare:
        console.print(compare(args.runs), highlight=False, markup=False)
        return 0
    overrides = list(args.overrides)
    if args.judge:
        kind, _, target = args.judge.partition(":")
        if kind not in ("rule", "model") or not target:
            raise DuetError(f"--judge {args.judge!r}: give rule:path/to/rules.py or model:path/to/model.")
        overrides += [f"judge.kind={kind}", f"judge.{kind}={target}"]
    if len(args.runs) > 1 and (args.out or args.tui or args.blind):
        raise DuetError("--out, --tui and --blind take one run; evaluate several runs without them.")
    if args.tui or args.blind:
        from tui.app import run_app

        if args.blind:
            return run_app(blind=(args.runs[0], overrides, args.prompts))
        return run_app(evaluate=(args.runs[0], overrides, args.prompts, args.checkpoints))
    reporter = ConsoleReporter(console)
    try:
        for source in args.runs:
            result = evaluate(
                source,
                overrides=overrides,
                prompts=args.prompts,
                base=args.base,
                checkpoints=args.checkpoints,
                out=args.out,
                emit=reporter,
            )
            reporter(Info(message=headline(result.report)))
            reporter(Info(message=f"report: {result.folder}/eval.md"))
    finally:
        reporter.close()
    return 0


def _doctor(model: str | None = None) -> int:
    from app.doctor import doctor

    return doctor(model=model)


def _models(args: argparse.Namespace) -> int:
    """The recommended models: what each is, whether it is ready here, and how to get it."""
    from rich.table import Table

    from models.registry import RECOMMENDED, availability

    table = Table(title="recommended models (model.path: NAME)", title_justify="left", show_lines=True)
    for column in ("name", "parameters", "what it is", "here"):
        table.add_column(column, overflow="fold")
    for model in RECOMMENDED.values():
        recipe = f"\nrecipe: {model.recipe}" if model.recipe else ""
        table.add_row(model.name, model.parameters, f"{model.summary}{recipe}", availability(model))
    Console().print(table)
    return 0


def _config(args: argparse.Namespace) -> int:
    from core.config import config_keys_text, config_yaml

    sys.stdout.write(config_yaml() if args.yaml else config_keys_text() + "\n")
    return 0


def _run_main(argv: list[str]) -> int:
    from app.run import main as run_main

    return run_main(argv)


def _bench_main(argv: list[str]) -> int:
    from bench.__main__ import main as bench_main

    return bench_main(argv)


def _key_value(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise DuetError(f"{flag} {text!r}: expected DUET_NAME=YOUR_COLUMN, e.g. prompt=question.")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duet", description="Preference fine-tuning (DPO, SimPO, ...) with LoRA.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("run", help="train headless (no arguments: the built-in demo)", add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(func=lambda args: _run_main(args.args))

    export = commands.add_parser(
        "export", help="convert an adapter: PEFT ↔ mlx-lm, or merge it into the model (a folder, or GGUF)"
    )
    export.add_argument("source", help="a run directory, a checkpoint, or an adapter folder (PEFT or mlx-lm)")
    export.add_argument("--to", required=True, choices=["peft", "mlx", "merged", "gguf"])
    export.add_argument(
        "out", help="the folder to write (must not exist, or be empty, unless --force); for gguf, a .gguf file"
    )
    export.add_argument("--base-model", help="the base model (default: the run's model or the adapter's record)")
    export.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    export.set_defaults(func=_export)

    tui = commands.add_parser("tui", help="the terminal UI (also what `duet` alone opens)")
    tui.add_argument("--config", help="open this config file in the set-up screen")
    tui.add_argument("--resume", metavar="RUN_DIR", help="resume an interrupted run and watch it train")
    tui.set_defaults(func=lambda args: _tui(config=args.config, resume=args.resume))

    evaluation = commands.add_parser(
        "eval", help="what training changed: win rate against the base, at equal length, KL, lengths", add_help=False
    )
    evaluation.add_argument("args", nargs=argparse.REMAINDER)
    evaluation.set_defaults(func=lambda args: _eval_main(args.args))

    collect = commands.add_parser(
        "collect",
        help="sample two answers per prompt and judge them (you, a rule or a model) into a file",
        add_help=False,
    )
    collect.add_argument("args", nargs=argparse.REMAINDER)
    collect.set_defaults(func=lambda args: _collect_main(args.args))

    watch = commands.add_parser("watch", help="follow a headless run's metrics (read-only dashboard)")
    watch.add_argument("run_dir", help="the run directory (its metrics.jsonl is followed as it grows)")
    watch.add_argument("--wait", action="store_true", help="wait for a run that has not created RUN_DIR yet")
    watch.set_defaults(func=lambda args: _tui(watch=args.run_dir, wait=args.wait))

    doctor = commands.add_parser("doctor", help="what this machine offers each backend")
    doctor.add_argument("--model", help="also check this model folder's config for what the MLX backend ignores")
    doctor.set_defaults(func=lambda args: _doctor(args.model))

    models = commands.add_parser("models", help="the recommended models (usable offline by name)")
    models.set_defaults(func=_models)

    config = commands.add_parser("config", help="list every config key with its default and what it does")
    config.add_argument("--yaml", action="store_true", help="print a complete config file, every key commented")
    config.set_defaults(func=_config)

    bench = commands.add_parser("bench", help="measure speed and memory on a named workload", add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=lambda args: _bench_main(args.args))

    inspect = commands.add_parser("inspect", help="validate and tokenize preference data, show a pair token by token")
    inspect.add_argument("data", help="a .jsonl/.json/.parquet file (optionally .gz), dataset folder or hub id")
    inspect.add_argument("--model", required=True, help="model folder or hub id whose tokenizer to use ('demo')")
    inspect.add_argument("--skip-invalid", action="store_true", help="skip bad rows (counted) instead of stopping")
    inspect.add_argument("--format", default="auto", help="force a data format instead of detecting it")
    inspect.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="NAME=COLUMN",
        help="read Duet's NAME (prompt, chosen, rejected, ...) from your COLUMN",
    )
    inspect.add_argument("--split", default="train", help="dataset split (folders and hub ids)")
    inspect.add_argument("--chat-template", default="auto", help="auto | plain | chatml | path to a .jinja file")
    inspect.add_argument("--max-length", type=int, default=1024)
    inspect.add_argument("--max-prompt-length", type=int, default=512, help="0 for no prompt limit")
    inspect.add_argument("--show", type=int, default=0, help="which usable pair to render (0-based)")
    inspect.add_argument("--full", action="store_true", help="render long prompts in full")
    inspect.add_argument("--batch-size", type=int, default=4, help="pairs per batch, for the padding estimate")
    inspect.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model folder's own Python code to run (off by default)",
    )
    inspect.set_defaults(func=_inspect)
    return parser


PASS_THROUGH = {
    "run": _run_main,
    "bench": _bench_main,
    "collect": _collect_main,
    "eval": _eval_main,
}  # commands with parsers of their own


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASS_THROUGH:  # argparse would read their options ("--config") as duet's own
        try:
            return PASS_THROUGH[argv[0]](argv[1:])
        except KeyboardInterrupt:
            return 130
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if handler is None:  # `duet` alone: the terminal UI
        handler = lambda _: _tui()  # noqa: E731
    try:
        return handler(args)
    except DuetError as exc:
        # a Text, not markup: messages hold brackets such as "chosen[1]" that rich would read as tags
        Console(stderr=True, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
