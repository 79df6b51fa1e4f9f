"""How many compute threads the engine runs on: the CPU it really has, re-measured as it runs.

Every op of a decode step is an OpenMP parallel region that ends in a barrier, so a step
runs hundreds of barriers, and each waits for the slowest thread. When another process
holds one of the cores (a neighbour on a shared node, the gateway in ``strata serve``, a
pod's CPU quota spent), the thread on that core runs only in the scheduler's time slices
and every barrier waits for its next slice: a step slows many-fold, far more than the lost
core's share. One thread fewer has no such stall. So the engine runs as many threads as
cores are free, and follows that number while it serves:

- the ceiling is what the process may use: its affinity mask, its cgroup's CPU quota
  (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``, rounded down) and the thread count it was
  started with (``OMP_NUM_THREADS``, or ``--threads`` which pins the count and turns this off);
- down: the compute threads spent time runnable but not running (``run_delay`` in
  ``/proc/<pid>/task/<tid>/schedstat``), or the cgroup throttled the process;
- up, one probe at a time: the process's CPUs sat idle (``/proc/stat``) while the engine
  stepped. A probe that brings the waits back is undone and the next one waits twice as long.

`decide` is the policy (readings in, thread count out, no clock or file); `ThreadGovernor`
owns the clock, the readings (``strata.engine.cpu_readings``) and ``torch.set_num_threads``. The engine loop calls
`ThreadGovernor.tick` before each step; it reads the files at most every `interval_s`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from strata.engine.cpu_readings import (
    CpuReading,
    CpuSample,
    ProcSampler,
    cgroup_stat_path,
    compute_thread_ids,
    parse_proc_stat_idle,
    read_quota_cores,
    usable_cores,
)

log = logging.getLogger("strata.engine")


# ---------------------------------------------------------------- the policy


@dataclass(frozen=True)
class GovernorConfig:
    """Thresholds of `decide` (per-second rates over one window)."""

    # Compute threads waiting this many thread-s per s in time-slice-long waits: one thread
    # too many (each barrier waits out a neighbour's slice); in brief waits, past
    # wait_down_brief (a small model's short regions make even a CPU-bound neighbour's
    # waits brief: 0.35 thread-s per s measured). A CPU-bound neighbour on one core makes
    # the thread there wait about a third to half its time; the client and HTTP threads of
    # a busy server, a tenth or two, which costs the second thread far less than dropping
    # it would: those must not flap the count.
    wait_down: float = 0.3
    wait_down_brief: float = 0.3
    throttled_down: float = 0.02  # cgroup throttled this share of the time
    idle_up: float = 0.5  # this much of a core idle while stepping: probe one thread more
    up_windows: int = 2  # idle for this many windows in a row before a probe
    probe_backoff_s: float = 2.0  # wait after a failed probe; doubles per failure
    probe_backoff_max_s: float = 60.0
    settle_s: float = 5.0  # a probe undone within this is a failed probe
    min_wall_s: float = 0.2  # shorter windows decide nothing


@dataclass(frozen=True)
class GovernorState:
    """What `decide` remembers between windows."""

    threads: int
    cap: int
    idle_windows: int = 0
    raised_at: float | None = None  # when the last probe up was made
    backoff_s: float = 0.0
    next_probe_at: float = 0.0
    reason: str = "start"


def decide(state: GovernorState, reading: CpuReading, now: float,
           config: GovernorConfig = GovernorConfig()) -> GovernorState:
    """The thread count for the next window, given the last window's reading."""
    c = config
    n = min(state.threads, state.cap)
    if reading.wall_s < c.min_wall_s:
        return state
    contended = (reading.wait_cores >= (c.wait_down if reading.long_waits else c.wait_down_brief)
                 or reading.throttled >= c.throttled_down)
    if contended and n > 1:
        # As many threads fewer as cores' worth of waiting, at least one.
        target = max(1, min(n - 1, math.floor(n - reading.wait_cores)))
        failed_probe = state.raised_at is not None and now - state.raised_at < c.settle_s
        backoff = min(c.probe_backoff_max_s, max(c.probe_backoff_s, 2 * state.backoff_s)) \
            if failed_probe else state.backoff_s
        why = (f"throttled {reading.throttled:.0%}" if reading.throttled >= c.throttled_down
               else f"threads waited {reading.wait_cores:.2f} cores for CPU")
        return replace(state, threads=target, idle_windows=0, raised_at=None, backoff_s=backoff,
                       next_probe_at=now + max(backoff, c.probe_backoff_s), reason=why)
    if state.raised_at is not None and now - state.raised_at >= c.settle_s:
        state = replace(state, raised_at=None, backoff_s=0.0)  # the probe held: forget failures
    if n >= state.cap or contended or reading.idle_cores < c.idle_up:
        return replace(state, threads=n, idle_windows=0)
    idle = state.idle_windows + 1
    if idle < c.up_windows or now < state.next_probe_at:
        return replace(state, threads=n, idle_windows=idle)
    target = min(state.cap, n + max(1, math.floor(reading.idle_cores + 1 - c.idle_up)))
    return replace(state, threads=target, idle_windows=0, raised_at=now,
                   reason=f"{reading.idle_cores:.2f} cores idle")


# ---------------------------------------------------------------- the actuator


class ThreadGovernor:
    """Applies `decide` in the engine thread: samples, decides, sets torch's thread count.

    ``fixed``: the count was pinned (``--threads``), never changed. ``set_threads`` and
    ``sampler`` are injectable for tests; the defaults are torch's and /proc's.
    """

    def __init__(self, cap: int, *, fixed: bool = False, interval_s: float = 0.5,
                 config: GovernorConfig = GovernorConfig(),
                 sampler: Callable[[float], CpuSample] | None = None,
                 set_threads: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fixed = fixed
        self.interval_s = interval_s
        self.config = config
        self.clock = clock
        self.state = GovernorState(threads=cap, cap=cap)
        self._sampler = sampler
        self._set = set_threads
        self._last: CpuSample | None = None
        self.changes = 0
        self.reading: CpuReading | None = None  # the last window's

    @property
    def threads(self) -> int:
        """Compute threads now."""
        return self.state.threads

    def _sample(self, now: float) -> CpuSample:
        if self._sampler is None:
            tid = threading.get_native_id()
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else list(range(os.cpu_count() or 1))
            self._sampler = ProcSampler(cpus, lambda: compute_thread_ids(tid), cgroup_stat_path())
        return self._sampler(now)

    def tick(self) -> None:
        """Call before each engine step, in the engine thread: at most every `interval_s`,
        read the counters, decide, and apply a new thread count."""
        if self.fixed:
            return
        now = self.clock()
        last = self._last
        if last is not None and now - last.t < self.interval_s:
            return
        sample = self._sample(now)
        self._last = sample
        if last is None or now - last.t > 4 * self.interval_s:
            return  # the first tick, or after an idle spell: a fresh window
        before = self.state
        reading = self.reading = CpuReading.between(last, sample)
        self.state = decide(before, reading, now, self.config)
        log.debug("compute threads %d: %s", before.threads, reading)
        if self.state.threads != before.threads:
            self.apply(self.state.threads)
            self.changes += 1
            log.info("compute threads %d -> %d (%s)", before.threads, self.state.threads,
                     self.state.reason)

    def apply(self, n: int) -> None:
        """Set the compute thread count (torch's intra-op pool) in the calling thread."""
        if self._set is not None:
            self._set(n)
            return
        import torch

        torch.set_num_threads(n)


def omp_threads_env() -> int | None:
    """``OMP_NUM_THREADS`` as a count (its first entry, as libgomp reads it), or None."""
    raw = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def governor_for(requested: int | None, device_type: str = "cpu") -> ThreadGovernor:
    """The engine's governor, its count applied: pinned at ``requested`` (``--threads``), else
    following the free cores under the ceiling of `usable_cores` (CPU devices only)."""
    import torch

    if requested:
        torch.set_num_threads(requested)
        return ThreadGovernor(requested, fixed=True)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else list(range(os.cpu_count() or 1))
    quota = read_quota_cores()
    # The ceiling the process was started with: OMP_NUM_THREADS, not torch's current count,
    # which an earlier engine's governor in the same process may have lowered.
    cap = usable_cores(len(cpus), quota, omp_threads_env())
    start = cap if device_type != "cpu" else starting_threads(cap, idle_cores_now(cpus))
    torch.set_num_threads(start)
    log.info("compute threads: %d, up to %d (%d CPUs allowed, quota %s), following the free "
             "cores", start, cap, len(cpus), "none" if quota is None else f"{quota:g} cores")
    gov = ThreadGovernor(cap, fixed=device_type != "cpu")
    gov.state = replace(gov.state, threads=start)
    return gov


def starting_threads(cap: int, idle_cores: float | None) -> int:
    """Threads to load the model and warm up on, before any step has been measured: the
    cores idle now plus the one this process is using, at most ``cap`` (None: unknown)."""
    if idle_cores is None:
        return cap
    return max(1, min(cap, math.floor(idle_cores + 1.5)))


def idle_cores_now(cpus: list[int], window_s: float = 0.25) -> float | None:
    """Cores of ``cpus`` idle over a short window now (/proc/stat), None where unreadable."""
    try:
        a = parse_proc_stat_idle(Path("/proc/stat").read_text(), cpus)
        time.sleep(window_s)
        b = parse_proc_stat_idle(Path("/proc/stat").read_text(), cpus)
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, b - a) / window_s
