"""Bad input everywhere a user types or loads something: each case gets one clear error naming the thing
and what to do, exit status 2, no traceback, and nothing already written is harmed."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from core.cli import main as duet
from core.run import main as run_main
from core.run import run
from tests.faults.support import run_dir, write_config
from tests.helpers import DEMO_MODEL, tiny_causal_lm

GOOD = {"prompt": "Name a fruit.", "chosen": "Mango.", "rejected": "Oh, I would say mango, I think."}


def jsonl(path: Path, *rows) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def inspect(tmp: Path, data: Path) -> list[str]:
    return ["inspect", str(data), "--model", str(DEMO_MODEL)]


def train(tmp: Path, *overrides: str, config: Path | None = None) -> list[str]:
    return ["run", "--config", str(config or write_config(tmp)), *overrides]


def finished_run(tmp: Path) -> Path:
    """A small run stopped at step 4 of 8 (checkpoints at 2 and 4): something a bad input must not harm."""
    from core.trainer import RunControl

    control = RunControl()
    run(
        str(write_config(tmp)),
        console=Console(file=io.StringIO()),
        control=control,
        callback=lambda e: control.request_stop() if e["type"] == "train" and e["step"] == 4 else None,
    )
    return run_dir(tmp)


def other_base_adapter(tmp: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    model = tiny_causal_lm("llama", vocab=512)
    folder = tmp / "other-adapter"
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


def copied_model(tmp: Path, drop: tuple[str, ...] = (), add: dict[str, bytes] | None = None) -> Path:
    folder = tmp / "model"
    shutil.copytree(DEMO_MODEL, folder)
    for name in drop:
        (folder / name).unlink()
    for name, content in (add or {}).items():
        (folder / name).write_bytes(content)
    return folder


def foreign_checkpoint(tmp: Path) -> list[str]:
    source = finished_run(tmp / "a")
    target = finished_run(tmp / "b")
    newest = sorted((target / "checkpoints").iterdir())[-1]
    shutil.rmtree(newest)
    shutil.copytree(sorted((source / "checkpoints").iterdir())[-1], newest)
    return ["run", "--resume", str(target)]


def edited_checkpoint(tmp: Path, edit: Callable[[Path], None]) -> list[str]:
    directory = finished_run(tmp)
    edit(sorted((directory / "checkpoints").iterdir())[-1])
    return ["run", "--resume", str(directory)]


def old_format(checkpoint: Path) -> None:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state.update(format=0, duet_version="0.0.1")
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def truncated_optimizer(checkpoint: Path) -> None:
    file = checkpoint / "optimizer.safetensors"
    file.write_bytes(file.read_bytes()[:100])


def yaml_config(tmp: Path, text: str) -> Path:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return path


# name: (argv builder, message regex). Every case must exit 2 with the message on stderr and no traceback.
CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    # data files
    "invalid JSON": (
        lambda t: inspect(t, jsonl(t / "d.jsonl", GOOD, b'{"prompt": ')),
        r"d\.jsonl:2: invalid JSON: Expecting value",
    ),
    "wrong type": (
        lambda t: inspect(t, jsonl(t / "d.jsonl", GOOD, {**GOOD, "chosen": 3})),
        r"d\.jsonl:2: field 'chosen': expected a string or an assistant message, got int",
    ),
    "missing field": (
        lambda t: inspect(t, jsonl(t / "d.jsonl", GOOD, {"prompt": "x", "chosen": "y"})),
        r"d\.jsonl:2: missing field 'rejected'",
    ),
    "empty field": (
        lambda t: inspect(t, jsonl(t / "d.jsonl", GOOD, {**GOOD, "rejected": "  "})),
        r"d\.jsonl:2: field 'rejected' is empty",
    ),
    "non-UTF-8 bytes": (
        lambda t: inspect(t, jsonl(t / "d.jsonl", GOOD, b'{"prompt": "\xff\xfe"}')),
        r"d\.jsonl:2: the bytes are not valid UTF-8 \(byte 0xff at column 13\)",
    ),
    "a 50 MB single line": (
        lambda t: inspect(t, jsonl(t / "d.jsonl", GOOD, {**GOOD, "prompt": "x" * 50_000_000})),
        r"d\.jsonl:2: the row is 47\.7 MB long; Duet reads rows up to 16 MB",
    ),
    "an empty file": (lambda t: inspect(t, jsonl(t / "d.jsonl")), r"d\.jsonl: the file is empty"),
    "an unknown format": (
        lambda t: inspect(t, jsonl(t / "d.jsonl", {"q": "a", "a": "b"})),
        r"cannot tell which preference format this is\. Keys seen in the first rows: a, q",
    ),
    "an unsupported file type": (
        lambda t: inspect(t, jsonl(t / "d.txt", GOOD)),
        r"d\.txt: unsupported file type '\.txt'",
    ),
    "a data file that does not exist": (
        lambda t: train(t, f"data.train={t / 'nope.jsonl'}"),
        r"nope\.jsonl: no such file or folder",
    ),
    "a broken chat template": (
        lambda t: train(t, "data.chat_template={% for m in messages %}{{ m.content }"),
        r"the template given in the config has a syntax error",
    ),
    # configs
    "an unknown key": (
        lambda t: train(t, "train.learning_rate=1e-4"),
        r"unknown key 'train\.learning_rate'.*Known keys here:",
    ),
    "a misspelt section": (
        lambda t: train(t, "objectve.beta=0.1"),
        r"unknown key 'objectve' \(did you mean 'objective'\?\)",
    ),
    "a wrong type": (lambda t: train(t, "train.lr=fast"), r"train\.lr: expected a number, got str 'fast'"),
    "beta ≤ 0": (lambda t: train(t, "objective.beta=0"), r"objective\.beta must be > 0, got 0\.0"),
    "lr ≤ 0": (lambda t: train(t, "train.lr=-1e-5"), r"train\.lr must be > 0, got -1e-05"),
    "max_prompt_length ≥ max_length": (
        lambda t: train(t, "data.max_prompt_length=256"),
        r"data\.max_prompt_length \(256\) must be below data\.max_length \(128\)",
    ),
    "a batch size of 0": (lambda t: train(t, "train.batch_size=0"), r"train\.batch_size must be > 0, got 0"),
    "label smoothing out of range": (
        lambda t: train(t, "objective.label_smoothing=0.7"),
        r"objective\.label_smoothing must be in \[0, 0\.5\)",
    ),
    "an unknown objective": (
        lambda t: train(t, "objective.name=reinforce"),
        r"objective\.name: 'reinforce' is not allowed; choose one of dpo, dpo_norm",
    ),
    "a YAML syntax error": (
        lambda t: ["run", "--config", str(yaml_config(t, "train:\n  lr: [1\n"))],
        r"bad\.yaml:\d+: not valid YAML",
    ),
    "a config file that does not exist": (
        lambda t: ["run", "--config", str(t / "missing.yaml")],
        r"config file .*missing\.yaml: no such file",
    ),
    "an override without a value": (lambda t: train(t, "train.lr"), r"override 'train\.lr': expected key=value"),
    "--resume with --config": (
        lambda t: ["run", "--config", str(write_config(t)), "--resume", str(t)],
        r"--resume takes the config saved in the run directory; drop --config",
    ),
    "a run name that escapes its folder": (
        lambda t: train(t, "train.run_name=../elsewhere"),
        r"train\.run_name '\.\./elsewhere' must be a plain folder name",
    ),
    "an absolute run name": (
        lambda t: train(t, "train.run_name=/tmp/x"),
        r"train\.run_name '/tmp/x' must be a plain folder name",
    ),
    # paths on the command line
    "a model folder that does not exist": (
        lambda t: train(t, f"model.path={t / 'no-model'}"),
        r"no-model: no such folder",
    ),
    "a hub id without the hub (HF_HUB_OFFLINE)": (
        lambda t: train(t, "model.path=nobody/no-such-model"),
        r"model nobody/no-such-model: the Hugging Face hub cannot be reached .*Pass a local model folder",
    ),
    "--resume of a folder that does not exist": (
        lambda t: ["run", "--resume", str(t / "nowhere")],
        r"--resume .*nowhere: no such run directory",
    ),
    "--resume of a folder that is not a run": (
        lambda t: ["run", "--resume", str(t)],
        r"not a Duet run directory \(no readable run\.json\)",
    ),
    "export from a folder that does not exist": (
        lambda t: ["export", str(t / "none"), "--to", "peft", str(t / "o")],
        r"none: no such run, checkpoint or adapter folder",
    ),
    "inspect with a model that does not exist": (
        lambda t: ["inspect", str(jsonl(t / "d.jsonl", GOOD)), "--model", str(t / "no-model")],
        r"no-model: no such folder",
    ),
    # model folders
    "a model folder without config.json": (
        lambda t: train(t, f"model.path={copied_model(t, drop=('config.json',))}"),
        r"no config\.json in .*model; give the folder a model was saved to",
    ),
    "a model folder without weights": (
        lambda t: train(t, f"model.path={copied_model(t, drop=('model.safetensors',))}"),
        r"no weights in .*model \(expected \*\.safetensors\)",
    ),
    "a model with pickled weights only": (
        lambda t: train(t, f"model.path={copied_model(t, ('model.safetensors',), {'pytorch_model.bin': b'x'})}"),
        r"its weights are pickle files \(pytorch_model\.bin\); Duet loads safetensors only",
    ),
    # adapters and checkpoints
    "an adapter for another base model": (
        lambda t: train(t, f"model.adapter={other_base_adapter(t)}"),
        r"model\.adapter .*other-adapter: PEFT could not load it onto this model",
    ),
    "a pickled adapter": (
        lambda t: train(t, f"model.adapter={copied_model(t, add={'adapter_model.bin': b'x'})}"),
        r"no adapter_model\.safetensors there \(pickled adapter_model\.bin files are refused",
    ),
    "a checkpoint from another run": (foreign_checkpoint, r"this checkpoint belongs to another run"),
    "a checkpoint from another Duet version": (
        lambda t: edited_checkpoint(t, old_format),
        r"written by Duet 0\.0\.1 in checkpoint format 0; this Duet",
    ),
    "a damaged checkpoint": (
        lambda t: edited_checkpoint(t, truncated_optimizer),
        r"incomplete or damaged checkpoint .*Delete this checkpoint folder to resume from",
    ),
    "a finished run resumed": (
        lambda t: ["run", "--resume", str(run_dir(t))] if run_main(["--config", str(write_config(t))]) == 0 else [],
        r"finished all 8 steps; .*train\.max_steps above 8",
    ),
}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and its content hash (to prove an error changed nothing)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "run.lock"
    }


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_clear_error(case: str, tmp_path: Path, capsys) -> None:
    build, pattern = CASES[case]
    argv = build(tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    code = duet(argv)
    captured = capsys.readouterr()
    assert code == 2, (captured.out[-1500:], captured.err[-1500:])
    assert re.search(pattern, captured.err, re.DOTALL), captured.err
    assert "Traceback" not in captured.err + captured.out
    after = snapshot(tmp_path)
    changed = [name for name in before if before[name] != after.get(name)]
    assert not changed, f"the error harmed {changed}"


def test_duplicated_pairs_are_reported_with_their_lines(tmp_path: Path) -> None:
    config = yaml.safe_load(write_config(tmp_path).read_text())
    data = Path(config["data"]["train"])
    rows = data.read_text().splitlines()
    data.write_text("\n".join([*rows, rows[0], rows[1]]) + "\n")
    result = run(str(tmp_path / "run.yaml"), ["train.max_steps=1"], console=Console(file=io.StringIO()))
    warnings = [e["message"] for e in result.events if e["type"] == "warning"]
    assert any(
        re.search(
            rf"2 duplicated pairs \(e\.g\. {re.escape(str(data))}:49 repeats "
            rf"{re.escape(str(data))}:1\) count twice in training; set data\.drop_duplicates=true",
            w,
        )
        for w in warnings
    ), warnings
