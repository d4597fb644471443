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

from core import faults
from core.errors import DuetError

TEMP_PREFIX = ".tmp-"
OLD_PREFIX = ".tmp-old-"  # a folder being replaced, kept until its successor is in place


class DiskError(DuetError):
    """Writing failed (disk full, permissions); nothing partial was left behind."""


def _read_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


_UMASK = _read_umask()  # read once, at import: changing the umask to read it is not thread-safe


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a new or renamed file) durable."""
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
            if faults.armed("write.partial"):  # killed half-way through writing the bytes
                handle.write(data[: len(data) // 2])
                handle.flush()
                faults.reach_now()
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        faults.reach("write.rename")
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise _disk_error(path, exc) from None
    fsync_dir(path.parent)


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
        fsync_dir(temp)
        faults.reach("dir.rename")
        if final.exists():
            if not replace:
                raise FileExistsError(errno.EEXIST, "already exists", str(final))
            # two renames: a crash between them leaves the old folder under OLD_PREFIX, which
            # remove_stale_temporaries puts back, so the previous version is never lost
            old = final.with_name(f"{OLD_PREFIX}{final.name}.{os.getpid()}")
            os.replace(final, old)
            faults.reach("dir.swap")
            os.replace(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, FileExistsError):
            raise DiskError(f"{final}: already exists; not overwritten.") from None
        raise _disk_error(final, exc) from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def recover(final: str | Path) -> None:
    """Put back ``final`` if a replacement of it was interrupted after the old one was moved aside."""
    final = Path(final)
    if final.exists():
        return
    for old in sorted(final.parent.glob(f"{OLD_PREFIX}{final.name}.*")):
        os.replace(old, final)
        return


def _writer_alive(name: str) -> bool:
    """Temporaries end in ".<pid>": is that process still running (and so maybe still writing)?"""
    pid = name.rsplit(".", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> None:
    """Clean up after an interrupted atomic write in ``folder``: a replaced folder whose successor never
    arrived is put back; unfinished temporaries of processes that are gone are removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for old in folder.glob(f"{OLD_PREFIX}*"):
        if _writer_alive(old.name):
            continue
        original = folder / old.name[len(OLD_PREFIX) :].rsplit(".", 1)[0]
        if original.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, original)
    for leftover in folder.glob(f"{TEMP_PREFIX}*"):
        if _writer_alive(leftover.name):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()
