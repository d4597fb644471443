"""Atomic writes: a crash, a kill or a full disk never leaves a half-written file where a good one was.

Files are written to a temporary name beside their destination, flushed and fsynced, then renamed over
it; folders are built under a temporary name and renamed into place. Rename is atomic on POSIX within one
file system, so a reader sees the old content or the new, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DuetError

TEMP_PREFIX = ".tmp-"


class DiskError(DuetError):
    """Writing failed (disk full, permissions); nothing partial was left behind."""


def _read_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


_UMASK = _read_umask()  # read once, at import: changing the umask to read it is not thread-safe


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _disk_error(path: Path, exc: OSError) -> DiskError:
    if exc.errno == errno.ENOSPC:
        return DiskError(
            f"{path}: the disk is full; nothing was written there. Free some space and retry "
            "(the previous version, if any, is intact)."
        )
    return DiskError(f"{path}: could not write it ({exc.strerror or exc}); nothing partial was left.")


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise _disk_error(path, exc) from None
    _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_safetensors(path: str | Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save

    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    write_bytes(path, save(contiguous, metadata=metadata))


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name; on success it becomes ``final`` in one rename.

    With ``replace``, an existing ``final`` is swapped out and removed only after the new one is in place.
    On any error the temporary folder is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.with_name(f"{TEMP_PREFIX}{final.name}.{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        mode = 0o666 & ~_UMASK  # some writers (safetensors) create private files; exports are for sharing
        for file in temp.rglob("*"):
            if file.is_file():
                os.chmod(file, mode)
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        _fsync_dir(temp)
        if final.exists():
            if not replace:
                raise FileExistsError(errno.EEXIST, "already exists", str(final))
            old = final.with_name(f"{TEMP_PREFIX}old-{final.name}.{os.getpid()}")
            os.replace(final, old)
            os.replace(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, FileExistsError):
            raise DiskError(f"{final}: already exists; not overwritten.") from None
        raise _disk_error(final, exc) from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: str | Path) -> None:
    """Remove what an interrupted atomic write left (temporary files and folders) in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in folder.glob(f"{TEMP_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()
