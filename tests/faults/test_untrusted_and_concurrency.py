"""Untrusted files are never executed or unpickled; two runs never share a run directory."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from core.errors import DuetError
from core.models_io import ModelError
from core.run import run
from core.rundir import RunDirError
from tests.faults.support import ROOT, duet, run_dir, write_config
from tests.helpers import DEMO_MODEL

SOURCES = [p for folder in ("core", "backends", "tui", "models", "bench") for p in (ROOT / folder).rglob("*.py")]


class Marker:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("code ran",))


def test_no_code_path_unpickles_anything() -> None:
    for source in SOURCES:
        tree = ast.parse(source.read_text(), str(source))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n in ("pickle", "cPickle", "dill", "joblib") for n in names), source
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load":
                owner = getattr(node.func.value, "id", "")
                if owner == "torch":
                    keywords = {k.arg: k.value for k in node.keywords}
                    assert "weights_only" in keywords and getattr(keywords["weights_only"], "value", None) is True, (
                        f"{source}:{node.lineno}: torch.load without weights_only=True"
                    )


def test_a_pickled_model_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned.txt"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Marker(str(marker))))
    config = write_config(tmp_path)
    with pytest.raises(ModelError, match="its weights are pickle files"):
        run(str(config), [f"model.path={folder}"], console=Console(file=io.StringIO()))
    for backend in ("torch", "mlx"):
        with pytest.raises(ModelError):
            run(str(config), [f"model.path={folder}", f"model.backend={backend}"], console=Console(file=io.StringIO()))
    assert not marker.exists()


def test_remote_code_is_off_unless_turned_on(tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, folder)
    marker = tmp_path / "pwned.txt"
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('code ran')\n"
        "from transformers import LlamaForCausalLM as EvilModel\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    result = run(
        str(write_config(tmp_path)), [f"model.path={folder}", "train.max_steps=1"], console=Console(file=io.StringIO())
    )
    assert result.adapter_dir.is_dir()  # trained with the built-in class, the folder's code ignored
    assert not marker.exists()


def test_a_dataset_folder_with_a_loading_script_does_not_run_it(tmp_path: Path) -> None:
    from core.data import load_preferences

    folder = tmp_path / "prefs"
    folder.mkdir()
    marker = tmp_path / "pwned.txt"
    (folder / "prefs.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('code ran')\n")
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    with contextlib.suppress(DuetError):  # refusing the folder is fine too; running its code is not
        load_preferences(folder)
    assert not marker.exists()


def test_a_second_run_with_the_same_name_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, max_steps=1)
    first = duet("--config", str(config))
    assert first.returncode == 0, first.stderr[-1500:]
    before = (run_dir(tmp_path) / "run.json").read_text()
    second = duet("--config", str(config))
    assert second.returncode == 2
    assert "already holds a run. Resume it with --resume" in second.stderr
    assert (run_dir(tmp_path) / "run.json").read_text() == before


@pytest.mark.slow
def test_two_runs_on_one_directory_and_a_stale_lock(tmp_path: Path) -> None:
    config = write_config(tmp_path, max_steps=100000, save_every=3)
    env = {**os.environ}
    env.pop("DUET_FAULT", None)
    live = subprocess.Popen(
        [sys.executable, "-m", "core.run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        checkpoints = run_dir(tmp_path) / "checkpoints"
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob("step-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        with pytest.raises(RunDirError, match=r"is in use by pid \d+ on .*two runs must not write one directory"):
            run(resume=run_dir(tmp_path), console=Console(file=io.StringIO()))
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    # the killed run's lock is stale: the operating system released it with the process
    newest = max(int(p.name[5:]) for p in checkpoints.glob("step-*"))
    resumed = duet("--resume", str(run_dir(tmp_path)), f"train.max_steps={newest + 2}")
    assert resumed.returncode == 0, resumed.stderr[-1500:]
