"""Which backends exist and which one a config gets: the registry of `BackendPlugin`s.

Backends register under the ``duet.backends`` entry-point group (pyproject.toml), so an installed
third-party package adds one without touching Duet. The built-in ones are also found in a checkout that
was never installed.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from importlib.metadata import entry_points

from core.backend import Backend, BackendError, BackendPlugin
from core.config import Config
from core.distributed import SINGLE, Collective, torchrun_environment

ENTRY_POINT_GROUP = "duet.backends"
BUILT_IN = {"torch": "backends.torch_backend", "mlx": "backends.mlx_backend"}


@cache
def backend_plugins() -> dict[str, BackendPlugin]:
    """Every registered backend by name, the built-in ones first."""
    found: dict[str, BackendPlugin] = {}
    for name, module in BUILT_IN.items():
        found[name] = import_module(module).plugin
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in found:
            continue
        plugin = entry.load()
        if not isinstance(plugin, BackendPlugin):
            raise BackendError(
                f"the {ENTRY_POINT_GROUP} entry point '{entry.name}' ({entry.value}) is no BackendPlugin."
            )
        found[plugin.name] = plugin
    return found


def backend_names() -> list[str]:
    return list(backend_plugins())


def resolve_backend_name(choice: str) -> str:
    """``auto``: the backend that prefers this machine most (MLX on Apple silicon, torch elsewhere)."""
    plugins = backend_plugins()
    if choice == "auto":
        return max(plugins.values(), key=lambda p: p.auto_preference()).name
    if choice not in plugins:
        raise BackendError(f"model.backend: unknown backend '{choice}'; choose auto or one of: {', '.join(plugins)}.")
    return choice


def join_job(config: Config) -> tuple[Collective, str]:
    """Under torchrun, this rank's place in the job, through the backend that trains (it forms the process
    group); otherwise one process on the config's device."""
    if torchrun_environment() is None:
        return SINGLE, config.model.device
    plugin = backend_plugins()[resolve_backend_name(config.model.backend)]
    if plugin.join_job is None:
        raise BackendError(_not_distributed(plugin))
    return plugin.join_job(config.model.device, config.train.distributed_timeout)


def _not_distributed(plugin: BackendPlugin) -> str:
    able = [p.name for p in backend_plugins().values() if p.distributed]
    return (
        f"torchrun runs the {' or '.join(able)} backend; this config asks for {plugin.name} "
        f"(set model.backend={able[0]})."
    )


def create_backend(config: Config, collective: Collective = SINGLE, device: str | None = None) -> Backend:
    """The backend a config asks for (not yet loaded). Under torchrun, ``collective`` and the rank's ``device``."""
    plugin = backend_plugins()[resolve_backend_name(config.model.backend)]
    if collective.enabled and not plugin.distributed:
        raise BackendError(_not_distributed(plugin))
    return plugin.create(config, collective, device)
