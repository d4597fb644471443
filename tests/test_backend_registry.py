"""Backends are found through a registry (the ``duet.backends`` entry points): a third-party backend installs
as a plugin, and ``auto``, the config and torchrun's check all read the registry."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

import app.backends as registry
from core.backend import BackendError, BackendPlugin
from core.distributed import Collective
from tests.helpers import quick_config


class Stub:
    """What a third-party backend's create() returns; enough to see it was the one built."""

    def __init__(self, device: str | None) -> None:
        self.device = device


stub = BackendPlugin("stub", lambda config, collective, device: Stub(device), lambda: 0, "a test backend")
eager = BackendPlugin("eager", lambda config, collective, device: Stub(device), lambda: 5, "prefers every machine")


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch):
    """The registry as it is when a package registers more backends under the entry-point group."""

    def entry_points(group: str):
        assert group == registry.ENTRY_POINT_GROUP
        return [
            EntryPoint("stub", f"{__name__}:stub", group),
            EntryPoint("eager", f"{__name__}:eager", group),
            EntryPoint("torch", "backends.torch_backend:plugin", group),  # the installed built-in: not twice
        ]

    monkeypatch.setattr(registry, "entry_points", entry_points)
    registry.backend_plugins.cache_clear()
    yield registry
    registry.backend_plugins.cache_clear()


def test_the_built_in_backends_are_registered() -> None:
    assert registry.backend_names()[:2] == ["torch", "mlx"]
    assert registry.resolve_backend_name("auto") == "torch"  # not Apple silicon: MLX's preference is 0 here


def test_a_plugin_backend_is_found_and_built(plugins, tmp_path) -> None:
    assert plugins.backend_names() == ["torch", "mlx", "stub", "eager"]
    built = plugins.create_backend(quick_config(tmp_path, model={"backend": "stub", "device": "cpu"}))
    assert isinstance(built, Stub) and built.device is None


def test_auto_takes_the_backend_that_prefers_this_machine(plugins) -> None:
    assert plugins.resolve_backend_name("auto") == "eager"


def test_an_unknown_backend_names_the_registered_ones(plugins) -> None:
    with pytest.raises(BackendError, match=r"unknown backend 'jax'; choose auto or one of: torch, mlx, stub, eager"):
        plugins.resolve_backend_name("jax")


def test_torchrun_takes_only_a_backend_that_trains_distributed(plugins, tmp_path) -> None:
    config = quick_config(tmp_path, model={"backend": "stub", "device": "cpu"})
    with pytest.raises(BackendError, match=r"torchrun runs the torch backend; this config asks for stub"):
        plugins.create_backend(config, Collective(rank=0, world_size=2))
