"""How many CPU threads the torch backend uses (``model.threads``).

torch starts one OpenMP thread per core and its threads spin-wait between parallel regions. On a machine
where another process already keeps a core busy, one of those threads keeps losing its core, and every
parallel region waits for it: on the 2-core benchmark machine, with one spinning process beside it, the
demo's steps ran 3.4× slower with torch's two threads than with one (docs/benchmarks.md, "Busy machine").
So ``auto`` counts the cores this process may use, subtracts those other processes keep busy right now, and
gives a tiny model no more threads than it can use.

Which setting wins: an explicit ``model.threads=N``, then ``OMP_NUM_THREADS`` from the environment, then auto.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Below this many parameters per thread a model's matrix products are too small to split: each parallel
# region costs more to fork and join than the slice of work it hands a thread. The demo (0.7M parameters)
# still ran 1.5× faster on 2 threads than on 1 (docs/benchmarks.md), so the bound keeps 2 threads for it;
# larger thread counts for tiny models are untested here (2 cores).
PARAMETERS_PER_THREAD = 250_000
# A GPU run's CPU-side tensors are small (batches, metrics, the optimizer's bookkeeping stays on the GPU):
# a few threads serve them, and more would only spin beside the data preparation.
ACCELERATOR_THREADS = 4
# How long the machine's load is watched: /proc/stat counts in ticks of 10 ms, so 0.1 s on one core is
# 10 ticks (a busy core reads as 0.9-1.0).
MIN_SAMPLE_SECONDS = 0.1
# How often a run under auto re-reads the load between steps: long enough that a step's own bursts average
# out, short enough that a process started beside the run costs it a few seconds, not the rest of the run.
RECHECK_SECONDS = 5.0
# How far past the half-core boundary a neighbour's load must be before a run already under way moves: a
# process using about half a core reads 0.45 at one look and 0.55 at the next, and without this band the
# count would move at every look (each move a parallel region's worth of re-forking, and a log line).
HYSTERESIS_CORES = 0.15
PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count a backend applies and where it came from (shown in the run's start message)."""

    threads: int
    source: str  # "model.threads", "OMP_NUM_THREADS" or "auto: ..." with the figures it used

    def describe(self) -> str:
        return f"{self.threads} thread{'s' if self.threads != 1 else ''} ({self.source})"


def auto_threads(cores: int, busy: float, parameters: int | None, *, accelerator: bool = False) -> int:
    """The thread count for ``model.threads=auto``: the cores not taken by other processes (a core counts as
    taken when at least half of it is busy), no more than a model of this size can use, at least one."""
    free = cores - math.floor(busy + 0.5)
    if accelerator:
        limit = ACCELERATOR_THREADS
    elif parameters is None:
        limit = cores
    else:
        limit = parameters // PARAMETERS_PER_THREAD
    return max(1, min(free, limit))


def environment_threads(environ: dict[str, str] | os._Environ) -> int | None:
    """OMP_NUM_THREADS as a count (its first level when nested, "4,2"); None when unset or not a count."""
    text = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def choose_threads(
    setting: int | str,
    environ: dict[str, str] | os._Environ,
    cores: int,
    busy: float,
    parameters: int | None,
    *,
    accelerator: bool = False,
) -> ThreadChoice:
    """The whole policy, without side effects: an explicit setting, then the environment, then auto."""
    if setting != "auto":
        return ThreadChoice(int(setting), "model.threads")
    from_environment = environment_threads(environ)
    if from_environment is not None:
        return ThreadChoice(from_environment, "OMP_NUM_THREADS")
    return ThreadChoice(auto_threads(cores, busy, parameters, accelerator=accelerator), auto_reason(cores, busy))


def auto_reason(cores: int, busy: float) -> str:
    """What auto saw, as the run's messages say it: e.g. "auto: 2 cores, 1 busy"."""
    return f"auto: {cores} core{'s' if cores != 1 else ''}, {math.floor(busy + 0.5)} busy"


# -- what the machine offers -----------------------------------------------------------------------------


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask; every CPU where there is none, as on macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit() -> float | None:
    """The container's CPU quota in cores (cgroup v2 cpu.max, or v1 cfs quota/period); None when unlimited."""
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = Path("/sys/fs/cgroup/cpu")
        quota = int((v1 / "cpu.cfs_quota_us").read_text())
        period = int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cores() -> int:
    cores = len(allowed_cpus())
    limit = cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit))) if limit else cores


def _cpu_ticks(cpus: list[int]) -> tuple[int, int] | None:
    """(busy, total) ticks since boot over these CPUs, from /proc/stat; None where there is no /proc/stat."""
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{index}" for index in cpus}
    busy = total = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            # user nice system idle iowait irq softirq steal (guest time is already inside user)
            ticks = [int(value) for value in fields[1:9]]
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


class LoadSample:
    """How many of this process's cores other processes keep busy, watched over an interval: started when
    the backend is made, read once the model has loaded, so the watching costs no extra time."""

    def __init__(self) -> None:
        self.cpus = allowed_cpus()
        self.started = time.monotonic()
        self.own_started = time.process_time()  # every thread of this process
        self.ticks = _cpu_ticks(self.cpus)

    def busy_cores(self) -> float:
        elapsed = time.monotonic() - self.started
        if elapsed < MIN_SAMPLE_SECONDS:
            time.sleep(MIN_SAMPLE_SECONDS - elapsed)
        ticks = _cpu_ticks(self.cpus)
        if self.ticks is None or ticks is None:
            return self._load_average()
        busy, total = ticks[0] - self.ticks[0], ticks[1] - self.ticks[1]
        if total <= 0:
            return 0.0
        seconds = time.monotonic() - self.started
        # busy cores over the interval, less this process's own share (loading the model, a UI thread)
        own = (time.process_time() - self.own_started) / seconds
        return max(0.0, busy / total * len(self.cpus) - own)

    @staticmethod
    def _load_average() -> float:
        """Without /proc/stat (macOS): the one-minute load average, less this process, which is running. It
        lags: a process started seconds ago barely shows."""
        try:
            return max(0.0, os.getloadavg()[0] - 1.0)
        except OSError:
            return 0.0


@dataclass
class ThreadGovernor:
    """``model.threads=auto`` during a run. The first choice is made once, when the model has loaded; a
    process that starts beside a run that began on an idle machine (a build, a test suite, a browser tab)
    would bring back the spinning cliff this module exists for, with the run stuck on its first count. So
    between steps, every ``interval`` seconds, the governor reads how many cores others kept busy since its
    last look and moves torch's thread count to what ``auto_threads`` says now (back up when they stop), once
    the load is ``HYSTERESIS_CORES`` past the boundary, so a neighbour that sits on it does not move the count
    back and forth."""

    cores: int
    parameters: int | None
    threads: int
    apply: Callable[[int], None]
    interval: float = RECHECK_SECONDS
    sample_load: Callable[[], LoadSample] = LoadSample
    reported: int = 0  # the count the run last logged (0: the one it started on)

    def __post_init__(self) -> None:
        self._sample = self.sample_load()
        self.reported = self.reported or self.threads
        self._busy = 0.0

    def look(self) -> None:
        """Re-read the load when it is due, and move the thread count if the policy now says otherwise."""
        if time.monotonic() - self._sample.started < self.interval:
            return
        self._busy = self._sample.busy_cores()
        self._sample = self.sample_load()
        threads = auto_threads(self.cores, self._busy, self.parameters)
        if threads != self.threads:
            # go as far as the load read HYSTERESIS_CORES nearer to the current count says: down only for a
            # load clearly over a boundary, up only for one clearly under it
            nearer = self._busy + (HYSTERESIS_CORES if threads > self.threads else -HYSTERESIS_CORES)
            threads = auto_threads(self.cores, max(0.0, nearer), self.parameters)
        if threads != self.threads:
            self.threads = threads
            self.apply(threads)

    def unreported(self) -> tuple[int, str] | None:
        """(threads, why) when the count moved since the run last logged it; then it counts as logged."""
        if self.threads == self.reported:
            return None
        self.reported = self.threads
        return self.threads, auto_reason(self.cores, self._busy)

    def continue_at(self, threads: int) -> None:
        """A resumed run: go on from the count the run was on at its checkpoint, as if never stopped."""
        self.threads = self.reported = threads
        self.apply(threads)
