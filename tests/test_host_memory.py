"""model.host_memory: which mmap threshold glibc is given, and that a bad value is a clear config error."""

from __future__ import annotations

import sys

import pytest

from app.api import config_from_dict
from backends.torch_backend import host_memory
from core.errors import ConfigError


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    fake = FakeLibc()
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: fake)
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setattr(host_memory, "_LIBC", False)  # looked up again, through the fake
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DUET_GLIBC_DEFAULT_MMAP", raising=False)
    return fake


def test_lean_and_fast_set_their_thresholds_once_each(libc: FakeLibc) -> None:
    assert host_memory.configure_host_memory("lean")
    assert host_memory.configure_host_memory("lean")  # already in effect: not set again
    assert host_memory.configure_host_memory("fast")
    assert libc.calls == [(host_memory.M_MMAP_THRESHOLD, 1 << 20), (host_memory.M_MMAP_THRESHOLD, 32 << 20)]


def test_the_environment_keeps_glibcs_own_policy(libc: FakeLibc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUET_GLIBC_DEFAULT_MMAP", "1")
    assert not host_memory.configure_host_memory("fast")
    assert libc.calls == []


def test_other_systems_are_left_alone(libc: FakeLibc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not host_memory.configure_host_memory("lean")
    assert libc.calls == []


def test_a_bad_setting_names_the_key_and_the_choices() -> None:
    config_from_dict({"model": {"host_memory": "fast"}}).validate()
    with pytest.raises(ConfigError, match="host_memory"):
        config_from_dict({"model": {"host_memory": "quick"}}).validate()


def test_a_pass_without_gradients_reuses_the_heap_then_gives_it_back(libc: FakeLibc) -> None:
    threshold = host_memory.M_MMAP_THRESHOLD
    host_memory.configure_host_memory("lean")
    with pytest.raises(KeyError), host_memory.heap_reuse():
        raise KeyError  # lean again even when the pass fails
    assert libc.calls == [(threshold, 1 << 20), (threshold, 32 << 20), (threshold, 1 << 20), ("trim", 0)]
    libc.calls.clear()
    host_memory.configure_host_memory("fast")
    with host_memory.heap_reuse():  # fast already reuses the heap
        pass
    assert libc.calls == [(threshold, 32 << 20)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's policy: Linux only")
def test_the_heap_a_pass_used_goes_back_to_the_system() -> None:
    """The real glibc: a no-grad pass's blocks (8 MiB each, freed as the next is made) stay in the heap while
    it runs and leave the resident size when it ends."""
    import torch

    from bench import memory

    if not host_memory.configure_host_memory("lean"):
        pytest.skip("glibc's policy is left alone here (DUET_GLIBC_DEFAULT_MMAP or no glibc)")
    # free pages an earlier test left resident in the heap would take the blocks without growing the resident
    # size (seen once in CI: exactly one block's 8 MiB more): hand them back first, as a step does
    host_memory.give_back_free_heap()
    before = memory.current_bytes()
    with host_memory.heap_reuse():
        block = torch.ones(2 << 20)
        for _ in range(20):
            block = block + 1  # each layer's output replaces the last
        inside = memory.current_bytes()
        del block
    after = memory.current_bytes()
    assert inside - before > 8 << 20  # the blocks were resident while the pass ran
    assert after - before < 4 << 20  # and went back when it ended


def test_free_heap_pages_go_back_after_a_step_under_lean_only(libc: FakeLibc) -> None:
    host_memory.configure_host_memory("lean")
    libc.calls.clear()
    assert host_memory.give_back_free_heap()
    assert libc.calls == [("trim", 0)]
    host_memory.configure_host_memory("fast")  # fast keeps its heap for the next step
    libc.calls.clear()
    assert not host_memory.give_back_free_heap()
    assert libc.calls == []
