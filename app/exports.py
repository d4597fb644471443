"""Exports: the library's adapter formats (PEFT, mlx-lm, a merged folder) and, for a model that came from a
GGUF file, a GGUF file that llama.cpp, Ollama and LM Studio load."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from core.adapters import AdapterError, read_adapter
from core.atomic import TEMP_PREFIX
from core.events import Callback
from core.export import FORMATS as ADAPTER_FORMATS
from core.export import ExportResult, adapter_source, export_adapter, resolve_base_model

FORMATS = (*ADAPTER_FORMATS, "gguf")


def export_run(
    source: str | Path,
    to: str,
    out: str | Path,
    *,
    base_model: str | None = None,
    force: bool = False,
    emit: Callback | None = None,
) -> ExportResult:
    """Write the adapter found at ``source`` as ``to``: a folder (peft, mlx, merged) or a .gguf file."""
    if to != "gguf":
        return export_adapter(source, to, out, base_model=base_model, force=force)
    from models.gguf import gguf_source, write_gguf

    out = Path(out).expanduser()
    if out.suffix.lower() != ".gguf":
        raise AdapterError(f"--to gguf writes one file: give OUT a .gguf name (not {out}).")
    if out.exists() and not force:
        raise AdapterError(f"{out} exists; choose another name or pass --force to replace it.")
    found = adapter_source(source)
    model = resolve_base_model(read_adapter(found.folder), base_model or found.base_model)
    original = gguf_source(model)  # refuses, with what to do, a model that did not come from a GGUF file
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, dir=out.parent) as scratch:
        merged = Path(scratch) / "merged"
        result = export_adapter(source, "merged", merged, base_model=str(model))
        partial = Path(scratch) / out.name
        write_gguf(merged, original, partial, emit)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())  # on disk before it takes the final name
        os.replace(partial, out)  # the file appears whole or not at all
    return ExportResult(out, result.source)


def export(source: str | Path, to: str, out: str | Path, *, base_model: str | None = None, force: bool = False) -> Path:
    """`export_run`, returning where the export is."""
    return export_run(source, to, out, base_model=base_model, force=force).out
