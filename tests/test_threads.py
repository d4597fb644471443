"""model.threads: the auto policy as a pure function, the load sample from /proc/stat, and what a built torch
backend applies (an explicit setting, then OMP_NUM_THREADS, then auto). No timings: the policy's figures are
given, not measured."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest
import torch

from app.backends import create_backend
from backends.torch_backend import threads
from backends.torch_backend.threads import auto_threads, choose_threads, environment_threads
from bench import worker
from bench.background import background_load
from bench.workloads import WORKLOADS
from core.config import ConfigError
from tests.helpers import quick_config

DEMO_PARAMETERS = 689_280  # the demo model (tiny-chat)
SMOLLM2_PARAMETERS = 134_515_008


@pytest.fixture
def restore_threads():
    """torch's thread count is per process: put it back so later tests run as they would alone."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# -- the policy --------------------------------------------------------------------------------------------


def test_auto_takes_the_free_cores_of_an_idle_machine() -> None:
    assert auto_threads(2, 0.0, DEMO_PARAMETERS) == 2
    assert auto_threads(16, 0.0, SMOLLM2_PARAMETERS) == 16
    assert auto_threads(1, 0.0, SMOLLM2_PARAMETERS) == 1


def test_auto_leaves_the_cores_other_processes_keep_busy() -> None:
    assert auto_threads(2, 1.0, SMOLLM2_PARAMETERS) == 1  # the benchmark machine with one spinning process
    assert auto_threads(16, 3.2, SMOLLM2_PARAMETERS) == 13
    assert auto_threads(8, 5.5, SMOLLM2_PARAMETERS) == 2  # a core counts as taken from half busy on
    assert auto_threads(8, 5.4, SMOLLM2_PARAMETERS) == 3


def test_auto_keeps_one_thread_on_a_saturated_machine() -> None:
    assert auto_threads(2, 2.0, SMOLLM2_PARAMETERS) == 1
    assert auto_threads(4, 9.0, SMOLLM2_PARAMETERS) == 1


def test_a_tiny_model_gets_no_more_threads_than_it_can_use() -> None:
    assert auto_threads(64, 0.0, DEMO_PARAMETERS) == 2  # 0.7M parameters: two threads still paid (measured)
    assert auto_threads(64, 0.0, 100_000) == 1
    assert auto_threads(64, 0.0, None) == 64  # size unknown: the cores decide


def test_a_gpu_run_keeps_a_few_cpu_threads() -> None:
    assert auto_threads(64, 0.0, SMOLLM2_PARAMETERS, accelerator=True) == threads.ACCELERATOR_THREADS
    assert auto_threads(2, 1.0, SMOLLM2_PARAMETERS, accelerator=True) == 1


def test_an_explicit_setting_then_the_environment_then_auto() -> None:
    environ = {"OMP_NUM_THREADS": "3"}
    assert choose_threads(5, environ, 2, 1.0, DEMO_PARAMETERS) == threads.ThreadChoice(5, "model.threads")
    assert choose_threads("auto", environ, 2, 1.0, DEMO_PARAMETERS) == threads.ThreadChoice(3, "OMP_NUM_THREADS")
    chosen = choose_threads("auto", {}, 2, 1.0, DEMO_PARAMETERS)
    assert chosen == threads.ThreadChoice(1, "auto: 2 cores, 1 busy")
    assert chosen.describe() == "1 thread (auto: 2 cores, 1 busy)"


def test_omp_num_threads_is_read_as_open_mp_reads_it() -> None:
    assert environment_threads({"OMP_NUM_THREADS": "4"}) == 4
    assert environment_threads({"OMP_NUM_THREADS": " 4,2 "}) == 4  # nested levels: the outer one
    for ignored in ("", "0", "-2", "many"):
        assert environment_threads({"OMP_NUM_THREADS": ignored}) is None
    assert environment_threads({}) is None


def test_usable_cores_honours_a_cgroup_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "allowed_cpus", lambda: list(range(8)))
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.usable_cores() == 2
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.usable_cores() == 8


def test_busy_cores_come_from_proc_stat_less_this_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Over the sample: cpu0 was busy for all its 100 ticks, cpu1 idle, cpu2 (not ours) busy; this process
    used 0.25 of a core, so other processes kept 0.75 of our two cores busy."""
    stat = tmp_path / "stat"

    def write(cpu0_user: int, cpu0_idle: int, cpu1_idle: int) -> None:
        stat.write_text(
            "cpu  1 2 3 4 5 6 7 8 0 0\n"
            f"cpu0 {cpu0_user} 0 0 {cpu0_idle} 0 0 0 0 0 0\n"
            f"cpu1 0 0 0 {cpu1_idle} 0 0 0 0 0 0\n"
            "cpu2 999 0 0 0 0 0 0 0 0 0\n"
        )

    clock = {"wall": 0.0, "own": 0.0}
    monkeypatch.setattr(threads, "PROC_STAT", stat)
    monkeypatch.setattr(threads, "allowed_cpus", lambda: [0, 1])
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(threads.time, "process_time", lambda: clock["own"])
    write(100, 50, 200)
    sample = threads.LoadSample()
    write(200, 50, 300)
    clock.update(wall=1.0, own=0.25)
    assert sample.busy_cores() == pytest.approx(0.75)


# -- the backend applies it --------------------------------------------------------------------------------


def build(tmp_path: Path, threads_setting: int | str):
    config = quick_config(tmp_path, model={"threads": threads_setting})
    backend = create_backend(config)
    backend.load_model(config.model.path)
    return backend


def test_model_threads_is_applied_when_the_backend_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_threads
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    backend = build(tmp_path, 1)
    assert torch.get_num_threads() == 1
    assert backend.info().details["threads"] == 1
    assert backend.info().details["threads_source"] == "model.threads"


def test_omp_num_threads_wins_over_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_threads) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)  # as if an earlier backend in this process had chosen otherwise
    backend = build(tmp_path, "auto")
    assert torch.get_num_threads() == 1
    assert backend.thread_choice == threads.ThreadChoice(1, "OMP_NUM_THREADS")


def test_auto_applies_what_the_policy_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_threads) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.LoadSample, "busy_cores", lambda self: 1.0)
    monkeypatch.setattr("backends.torch_backend.backend.usable_cores", lambda: 2)
    backend = build(tmp_path, "auto")
    assert torch.get_num_threads() == 1
    assert backend.thread_choice == threads.ThreadChoice(1, "auto: 2 cores, 1 busy")


class FakeSample:
    """A LoadSample whose busy cores a test sets, started "long ago" so every look is due."""

    busy = 0.0
    started = float("-inf")

    def busy_cores(self) -> float:
        return FakeSample.busy


def test_the_governor_follows_a_load_that_comes_and_goes() -> None:
    applied: list[int] = []
    governor = threads.ThreadGovernor(2, SMOLLM2_PARAMETERS, 2, applied.append, sample_load=FakeSample)
    FakeSample.busy = 0.0
    governor.look()
    assert applied == [] and governor.unreported() is None  # nothing changed: nothing applied or to log
    FakeSample.busy = 0.9  # a process began spinning beside the run
    governor.look()
    assert governor.unreported() == (1, "auto: 2 cores, 1 busy")
    assert governor.unreported() is None  # logged once
    FakeSample.busy = 1.0  # with one thread, the other process still holds its core: stay
    governor.look()
    FakeSample.busy = 0.0  # it ended
    governor.look()
    assert applied == [1, 2] and governor.unreported() == (2, "auto: 2 cores, 0 busy")


def test_a_move_and_its_return_between_two_logs_leave_nothing_to_log() -> None:
    applied: list[int] = []
    governor = threads.ThreadGovernor(2, SMOLLM2_PARAMETERS, 2, applied.append, sample_load=FakeSample)
    FakeSample.busy = 1.0
    governor.look()
    FakeSample.busy = 0.0
    governor.look()
    assert applied == [1, 2] and governor.unreported() is None


def test_a_neighbour_on_the_half_core_boundary_does_not_move_the_count_back_and_forth() -> None:
    applied: list[int] = []
    governor = threads.ThreadGovernor(2, SMOLLM2_PARAMETERS, 2, applied.append, sample_load=FakeSample)
    for busy in (0.55, 0.45, 0.6, 0.4, 0.55):  # about half a core: on the boundary, so stay on 2
        FakeSample.busy = busy
        governor.look()
    assert applied == [] and governor.unreported() is None
    FakeSample.busy = 0.7  # clearly over it: down
    governor.look()
    for busy in (0.45, 0.4, 0.55):  # back near the boundary: stay on 1
        FakeSample.busy = busy
        governor.look()
    assert applied == [1]
    FakeSample.busy = 0.3  # clearly under it: up
    governor.look()
    assert applied == [1, 2]


def test_a_large_jump_moves_as_far_as_the_band_allows() -> None:
    applied: list[int] = []
    governor = threads.ThreadGovernor(8, 10**9, 8, applied.append, sample_load=FakeSample)
    FakeSample.busy = 2.55  # auto says 5 on this reading, 6 on one HYSTERESIS_CORES lower
    governor.look()
    governor.look()  # the same reading again: no further move
    assert applied == [6]
    FakeSample.busy = 3.7  # clearly 4 busy
    governor.look()
    assert applied == [6, 4]


def test_the_governor_looks_only_every_interval() -> None:
    class JustStarted(FakeSample):
        def __init__(self) -> None:
            self.started = time.monotonic()

    applied: list[int] = []
    FakeSample.busy = 1.0
    governor = threads.ThreadGovernor(
        2, SMOLLM2_PARAMETERS, 2, applied.append, interval=3600.0, sample_load=JustStarted
    )
    governor.look()  # the machine is busy, but the sample started just now: not due
    assert applied == []
    governor.interval = 0.0
    governor.look()
    assert applied == [1]


def test_a_run_on_auto_moves_its_threads_when_the_machine_gets_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_threads
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("backends.torch_backend.backend.usable_cores", lambda: 2)
    monkeypatch.setattr(threads.LoadSample, "busy_cores", lambda self: 0.0)
    backend = build(tmp_path, "auto")
    backend.attach_lora(quick_config(tmp_path).lora)
    assert torch.get_num_threads() == 2 and backend.thread_choice.source == "auto: 2 cores, 0 busy"
    backend._governor.interval = 0.0
    monkeypatch.setattr(threads.LoadSample, "busy_cores", lambda self: 1.0)
    from tests.helpers import random_batch

    backend.sequence_logps(random_batch(backend.tokenizer.vocab_size, rows=2, seed=0), adapter=False)
    assert torch.get_num_threads() == 1  # a reference or eval pass follows the load too
    assert backend.info().details["threads"] == 1
    assert backend.between_steps() == (1, "auto: 2 cores, 1 busy")
    assert backend.between_steps() is None


def test_an_explicit_thread_count_is_never_moved(tmp_path: Path, restore_threads) -> None:
    backend = build(tmp_path, 1)
    assert backend._governor is None and backend.between_steps() is None
    backend.continue_threads(2)
    assert torch.get_num_threads() == 1


def test_model_threads_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.threads"):
        quick_config(tmp_path, model={"threads": 0})


# -- the bench -----------------------------------------------------------------------------------------------


def test_the_thread_variants_set_model_threads() -> None:
    demo = WORKLOADS["demo"]
    one = worker.duet_config(demo, worker.VARIANTS["duet-torch-threads1"], 3, "cpu", "auto")
    assert one.model.threads == 1
    torch_default = worker.duet_config(demo, worker.VARIANTS["duet-torch-threads-torch"], 3, "cpu", "auto")
    assert torch_default.model.threads == torch.get_num_threads()
    assert worker.duet_config(demo, worker.VARIANTS["duet-torch"], 3, "cpu", "auto").model.threads == "auto"


def test_background_load_starts_and_stops_its_processes() -> None:
    with background_load(2) as spinners:
        assert len(spinners) == 2 and all(spinner.poll() is None for spinner in spinners)
    assert all(spinner.returncode is not None for spinner in spinners)
    with background_load(0) as none:
        assert none == []


def test_a_resumed_run_keeps_the_thread_count_it_started_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_threads
) -> None:
    """Resumed on a machine now busier, a run keeps the count it had at its checkpoint (another count splits
    reductions differently, and the resumed steps would not be bit-exact)."""
    import io

    from rich.console import Console

    from core.run import run
    from core.trainer import RunControl

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "auto_threads", lambda *a, **k: 2)
    monkeypatch.setattr(  # the load is not looked at again during the run
        "backends.torch_backend.backend.ThreadGovernor", functools.partial(threads.ThreadGovernor, interval=3600.0)
    )
    control = RunControl()

    def stop_at_two(event) -> None:
        if event["type"] == "train" and event["step"] == 2:
            control.request_stop("test interruption")

    config = quick_config(tmp_path, model={"threads": "auto"}, train={"max_steps": 4, "save_every": 1})
    quiet = Console(file=io.StringIO())
    first = run(config, console=quiet, callback=stop_at_two, control=control)
    assert first.stopped
    monkeypatch.setattr(threads, "auto_threads", lambda *a, **k: 1)  # the machine got busy meanwhile
    resumed = run(resume=first.run_dir, console=quiet)
    starts = [e for e in resumed.events if e["type"] == "start"]
    assert [e["threads"] for e in starts] == [2] and torch.get_num_threads() == 2


def test_a_resumed_run_goes_on_from_the_count_logged_before_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_threads
) -> None:
    """The machine gets busy after step 1: auto moves to one thread and logs it; the run stops at step 2. The
    resumed run starts on one thread, the count its checkpoint was taken on, whatever the machine says now."""
    import io

    from rich.console import Console

    from core.run import run
    from core.trainer import RunControl

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    policy = [2]
    monkeypatch.setattr(threads, "auto_threads", lambda *a, **k: policy[0])
    monkeypatch.setattr(  # a look at every step
        "backends.torch_backend.backend.ThreadGovernor", functools.partial(threads.ThreadGovernor, interval=0.0)
    )
    control = RunControl()

    def busy_after_one(event) -> None:
        if event["type"] == "train" and event["step"] == 1:
            policy[0] = 1
        if event["type"] == "train" and event["step"] == 2:
            control.request_stop("test interruption")

    config = quick_config(tmp_path, model={"threads": "auto"}, train={"max_steps": 4, "save_every": 1})
    quiet = Console(file=io.StringIO())
    first = run(config, console=quiet, callback=busy_after_one, control=control)
    moves = [(e["step"], e["threads"]) for e in first.events if e["type"] == "threads"]
    assert first.stopped and moves == [(1, 1)]
    assert "after step 1: now 1 thread (auto: " in next(e["message"] for e in first.events if e["type"] == "threads")

    policy[0] = 2  # idle again, but the resumed run must not look before its first step
    monkeypatch.setattr(
        "backends.torch_backend.backend.ThreadGovernor", functools.partial(threads.ThreadGovernor, interval=3600.0)
    )
    resumed = run(resume=first.run_dir, console=quiet)
    starts = [e for e in resumed.events if e["type"] == "start"]
    assert [e["threads"] for e in starts] == [1] and torch.get_num_threads() == 1
    assert "1 thread by auto, as the run was when it stopped" in starts[0]["message"]


def test_the_count_at_the_checkpoint_is_the_last_logged_before_it(tmp_path: Path) -> None:
    """A move logged after the newest checkpoint (the run died before the next one) is not the count the
    resumed steps were first taken on; the last one before the checkpoint's metrics offset is."""
    import json

    from app.run import _threads_at_checkpoint
    from core.checkpoint import STATE_FILE, TrainerState, checkpoint_path
    from core.events import RunStarted, ThreadsChanged
    from core.rundir import RunDirectory

    run_dir = RunDirectory(tmp_path / "run", "r1")
    run_dir.path.mkdir()
    lines = [RunStarted(threads=2), ThreadsChanged(step=3, threads=1), ThreadsChanged(step=9, threads=2)]
    encoded = [json.dumps(e.to_json()) + "\n" for e in lines]
    run_dir.metrics_file.write_text("".join(encoded))
    assert _threads_at_checkpoint(run_dir) == 2  # no checkpoint: the run starts over, on its first count
    checkpoint = checkpoint_path(run_dir.path, 5)
    checkpoint.mkdir(parents=True)
    state = TrainerState(run_id="r1", total_steps=20, step=5, metrics_offset=len("".join(encoded[:2]).encode()))
    (checkpoint / STATE_FILE).write_text(json.dumps(state.to_dict()))
    assert _threads_at_checkpoint(run_dir) == 1
