"""The run directory: resolved config, metrics, reference log-probs, checkpoints, the final adapter; and the
lock that keeps two runs out of one directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from core import __version__
from core.atomic import TEMP_PREFIX, remove_stale_temporaries, write_text
from core.config import Config, load_config
from core.errors import DuetError

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "run.lock"


class RunDirError(DuetError):
    """A run directory that cannot be created, resumed or locked."""


@dataclass
class RunDirectory:
    path: Path
    run_id: str

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def reference_dir(self) -> Path:
        return self.path / "reference"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @classmethod
    def create(cls, config: Config, fingerprints: dict[str, str] | None = None) -> RunDirectory:
        """A new run directory; two runs started at once never share one (creation is exclusive)."""
        root = Path(config.train.output_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        name = config.train.run_name or time.strftime("%Y%m%d-%H%M%S")
        path = root / name
        if config.train.run_name is None:
            suffix = 1
            while True:
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    suffix += 1
                    path = root / f"{name}-{suffix}"
        else:
            path.mkdir(exist_ok=True)
        run = cls(path, uuid.uuid4().hex)
        record = {
            "run_id": run.run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "duet_version": __version__,
            "data_fingerprints": fingerprints or {},
        }
        temporary = path / f"{TEMP_PREFIX}{RUN_FILE}.{os.getpid()}"
        write_text(temporary, json.dumps(record, indent=2) + "\n")
        try:  # a hard link is created whole or not at all, and only if the name is free: one run per folder
            os.link(temporary, path / RUN_FILE)
        except FileExistsError:
            raise RunDirError(
                f"run directory {path} already holds a run. Resume it with --resume {path}, or choose "
                "another train.run_name."
            ) from None
        finally:
            temporary.unlink(missing_ok=True)
        write_text(run.config_file, config.to_yaml())
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise RunDirError(f"--resume {path}: no such run directory.")
        try:
            run_id = json.loads((path / RUN_FILE).read_text())["run_id"]
        except (OSError, ValueError, KeyError):
            raise RunDirError(f"--resume {path}: not a Duet run directory (no readable {RUN_FILE}).") from None
        if not (path / CONFIG_FILE).is_file():
            raise RunDirError(f"--resume {path}: the run's {CONFIG_FILE} is missing.")
        return cls(path, run_id)

    def remove_stale_temporaries(self) -> None:
        """What an interrupted write left behind; only ever called with the lock held."""
        for folder in (self.path, self.path / "checkpoints", self.reference_dir):
            remove_stale_temporaries(folder)

    def check_fingerprints(self, fingerprints: dict[str, str]) -> None:
        """Resuming needs the very data the run started with (same files, tokenizer, template, truncation)."""
        recorded = json.loads((self.path / RUN_FILE).read_text()).get("data_fingerprints") or {}
        for split, value in recorded.items():
            if fingerprints.get(split) != value:
                raise RunDirError(
                    f"--resume {self.path}: the {split} data differ from those the run started with "
                    "(a changed data file, tokenizer, chat template or truncation setting). Restore "
                    "them, or start a new run."
                )

    def load_config(self, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        return load_config(self.config_file, overrides)

    @contextlib.contextmanager
    def lock(self):
        """Hold an exclusive lock on the run directory for the life of the run.

        The operating system drops the lock when its process dies, so a lock left by a killed run is stale
        by construction and simply taken over.
        """
        path = self.path / LOCK_FILE
        handle = open(path, "a+")  # noqa: SIM115 - the lock lives as long as the run
        for attempt in range(10):  # `duet watch` peeks at the lock for an instant: a short wait is not a conflict
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt < 9:
                    time.sleep(0.05)
        else:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(
                f"run directory {self.path} is in use by {holder}. Wait for that run to finish or "
                "stop it; two runs must not write one directory."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
