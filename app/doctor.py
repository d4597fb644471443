"""``duet doctor``: what this machine offers each backend, and why a backend cannot run here."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

GIB = 1024**3


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _memory_bytes() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def torch_report() -> dict[str, Any]:
    try:
        import torch
    except ImportError as exc:
        return {"usable": False, "why": f"torch does not import: {exc}"}
    report: dict[str, Any] = {"usable": True, "version": torch.__version__, "devices": ["cpu"]}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            report["devices"].append(
                f"cuda:{index} {properties.name} ({properties.total_memory / GIB:.0f} GiB, "
                f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'})"
            )
    else:
        report["cuda"] = f"no CUDA GPU visible (this torch is built for CUDA {torch.version.cuda or 'none: CPU build'})"
    if torch.backends.mps.is_available():
        report["devices"].append("mps (Apple GPU)")
    return report


def mlx_report() -> dict[str, Any]:
    try:
        import mlx.core as mx
    except ImportError as exc:
        return {
            "usable": False,
            "why": f"mlx does not import ({exc}); pip install 'mlx[cpu]' mlx-lm on Linux, mlx mlx-lm on macOS",
        }
    report: dict[str, Any] = {"usable": True, "version": _version("mlx"), "device": str(mx.default_device())}
    try:
        info = mx.device_info()
    except Exception:  # CPU builds may offer no device information at all
        info = {}
    # Metal builds report memory_size and the GPU architecture; the CPU build has neither key.
    if "memory_size" in info:
        report["memory"] = f"{info['memory_size'] / GIB:.0f} GiB unified"
    report["name"] = info.get("device_name", platform.processor() or platform.machine())
    if mx.default_device() == mx.cpu:
        report["note"] = "CPU build: correct but slow (single-threaded BLAS); use Apple silicon for speed"
    try:
        import mlx_lm  # noqa: F401
    except ImportError as exc:
        report.update(usable=False, why=f"mlx-lm does not import: {exc}")
    return report


def model_report(path: str) -> list[str]:
    """What the MLX backend would ignore or refuse in a local model folder's config.json (rope settings mlx-lm
    cannot map, keys it does not read); empty when MLX builds the model transformers builds."""
    from core.model_config import config_warnings
    from core.models_io import ModelError, resolve_model_path

    try:
        return config_warnings(resolve_model_path(path))
    except ModelError as exc:
        return [str(exc)]


def doctor(console: Console | None = None, model: str | None = None) -> int:
    """The machine report; with ``model`` (a local folder), also what the MLX side ignores in its config."""
    from app.backends import resolve_backend_name
    from core.backend import is_apple_silicon

    console = console or Console()
    memory = _memory_bytes()
    console.print(
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}"
        f"{f', {memory / GIB:.0f} GiB memory' if memory else ''}, {os.cpu_count()} CPUs"
    )
    versions = Table(title="packages", title_justify="left", show_edge=False)
    versions.add_column("package")
    versions.add_column("version")
    for package in ("torch", "transformers", "peft", "mlx", "mlx-lm", "safetensors", "datasets", "textual"):
        versions.add_row(package, _version(package))
    console.print(versions)
    torch_info, mlx_info = torch_report(), mlx_report()
    console.print(
        "[bold]torch[/]: " + (", ".join(torch_info["devices"]) if torch_info["usable"] else torch_info["why"]),
        highlight=False,
    )
    if "cuda" in torch_info:
        console.print(f"  {torch_info['cuda']}", highlight=False)
    if mlx_info["usable"]:
        details = ", ".join(f"{k} {v}" for k, v in mlx_info.items() if k not in ("usable", "version"))
        console.print(f"[bold]mlx[/] {mlx_info['version']}: {details}", highlight=False)
    else:
        console.print(f"[bold]mlx[/]: cannot run here: {mlx_info['why']}", highlight=False)
    chosen = resolve_backend_name("auto")
    reason = (
        "Apple silicon with MLX"
        if chosen == "mlx"
        else ("not Apple silicon" if not is_apple_silicon() else "MLX is not installed")
    )
    console.print(f"backend auto → [bold]{chosen}[/] ({reason})", highlight=False)
    if model is not None:
        notes = model_report(model)
        said = "what MLX ignores or refuses in its config" if notes else "MLX reads its config as transformers does"
        console.print(f"[bold]model[/] {model}: {said}", highlight=False)
        for note in notes:
            console.print(Text.assemble("  ", ("warning: ", "yellow"), note), highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(doctor())
