"""What CPU the engine process has: its ceiling (affinity, cgroup quota) and, per window, how
long its compute threads waited for a core and how many of its cores sat idle.

Parsers take the files' text (tested on their own); `ProcSampler` reads the files. Linux
only; elsewhere the sampler reads zeros and the engine keeps its thread count.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---------------------------------------------------------------- what the process may use


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` (``"150000 100000"`` or ``"max 100000"``) -> cores, None: no limit."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = float(parts[1]) if len(parts) > 1 else 100000.0
    return float(parts[0]) / period if period > 0 else None


def parse_cfs_quota(quota_us: str, period_us: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` -> cores, None: no limit."""
    quota, period = int(quota_us.strip()), int(period_us.strip())
    return quota / period if quota > 0 and period > 0 else None


def cgroup_dirs(proc_cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> list[Path]:
    """The cgroup directories that may hold this process's CPU limit, innermost first.

    ``proc_cgroup`` is ``/proc/self/cgroup``; a limit set on any ancestor applies too, and
    inside a container the innermost path is often the mount's root itself.
    """
    out: list[Path] = []
    for line in proc_cgroup.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            base = root if (root / "cpu.max").exists() or not (root / "unified").exists() \
                else root / "unified"
        elif "cpu" in controllers.split(","):
            base = root / controllers
            if not base.exists():
                base = root / "cpu"
        else:
            continue
        rel = Path(path.lstrip("/"))
        while True:
            out.append(base / rel)
            if rel == Path("."):
                break
            rel = rel.parent
    return out


def _own_cgroups() -> str | None:
    """This process's ``/proc/self/cgroup``, or None where there is none."""
    try:
        return Path("/proc/self/cgroup").read_text()
    except OSError:
        return None


def read_quota_cores(proc_cgroup: str | None = None, root: Path = Path("/sys/fs/cgroup")
                     ) -> float | None:
    """The tightest CPU quota (in cores) of this process's cgroups; None: none set."""
    proc_cgroup = proc_cgroup if proc_cgroup is not None else _own_cgroups()
    if proc_cgroup is None:
        return None
    limits: list[float] = []
    for d in cgroup_dirs(proc_cgroup, root):
        try:
            if (d / "cpu.max").exists():
                q = parse_cpu_max((d / "cpu.max").read_text())
            elif (d / "cpu.cfs_quota_us").exists():
                q = parse_cfs_quota((d / "cpu.cfs_quota_us").read_text(),
                                    (d / "cpu.cfs_period_us").read_text())
            else:
                continue
        except (OSError, ValueError, IndexError):
            continue
        if q is not None:
            limits.append(q)
    return min(limits, default=None)


def usable_cores(affinity: int, quota_cores: float | None, started_with: int | None) -> int:
    """Threads worth running at most: the allowed CPUs, the quota rounded down, the start count.

    A quota is rounded down because a thread beyond it gets throttled for the rest of each
    period, the same stall as a neighbour on its core; below one core, one thread.
    """
    cap = max(1, affinity)
    if quota_cores is not None:
        cap = min(cap, max(1, math.floor(quota_cores + 1e-6)))
    if started_with:
        cap = min(cap, started_with)
    return cap


# ---------------------------------------------------------------- readings


@dataclass(frozen=True)
class CpuSample:
    """Cumulative counters at one instant (seconds), differenced into a `CpuReading`."""

    t: float  # monotonic
    idle_s: float  # idle + iowait time of the process's CPUs (/proc/stat)
    wait_s: float  # run-queue wait of the compute threads (schedstat run_delay)
    throttled_s: float  # cgroup throttled time (cpu.stat), 0 where unknown
    switches: int = 0  # times the compute threads were switched in (schedstat pcount)


@dataclass(frozen=True)
class CpuReading:
    """One window: how many cores sat idle and how long the compute threads waited, per second."""

    wall_s: float
    idle_cores: float
    wait_cores: float  # thread-seconds runnable but not running, per second
    throttled: float  # fraction of the window the cgroup was throttled
    wait_per_switch_s: float = 0.0  # mean wait before each switch-in

    @property
    def long_waits(self) -> bool:
        """Whether the waits are time-slice long (a CPU-bound neighbour shares the core), as
        opposed to brief preemptions by short wake-ups (HTTP, a client, kernel threads)."""
        return self.wait_per_switch_s >= 0.0005

    @classmethod
    def between(cls, a: CpuSample, b: CpuSample) -> CpuReading:
        """The window from sample ``a`` to sample ``b``."""
        wall = max(b.t - a.t, 1e-9)
        wait = max(0.0, b.wait_s - a.wait_s)
        return cls(wall, max(0.0, b.idle_s - a.idle_s) / wall, wait / wall,
                   max(0.0, b.throttled_s - a.throttled_s) / wall,
                   wait / max(1, b.switches - a.switches))


def parse_proc_stat_idle(text: str, cpus: Iterable[int], niced_free: bool = False) -> float:
    """Idle + iowait seconds of ``cpus`` from ``/proc/stat`` text (steal counts as busy).

    ``niced_free``: count the time of niced processes (``nice`` column) as free too, as it
    is for a process at nice 0 or below: the scheduler gives such neighbours only slivers.
    """
    want = {f"cpu{c}" for c in cpus}
    total = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name in want:
            f = rest.split()
            total += int(f[3]) + int(f[4]) + (int(f[1]) if niced_free else 0)
    return total / _CLK_TCK


def parse_schedstat(text: str) -> tuple[float, int]:
    """Run-queue wait (seconds) and switch-ins from one ``/proc/.../schedstat`` line
    (``run_ns wait_ns pcount``)."""
    f = text.split()
    return (int(f[1]) / 1e9 if len(f) >= 2 else 0.0), (int(f[2]) if len(f) >= 3 else 0)


def parse_throttled(cpu_stat: str) -> float:
    """Throttled seconds from a cgroup ``cpu.stat`` (v2 ``throttled_usec``, v1 ``throttled_time`` ns)."""
    for line in cpu_stat.splitlines():
        key, _, value = line.partition(" ")
        if key == "throttled_usec":
            return int(value) / 1e6
        if key == "throttled_time":
            return int(value) / 1e9
    return 0.0


class ProcSampler:
    """Reads a `CpuSample` from /proc and the cgroup files (Linux; elsewhere, zeros)."""

    def __init__(self, cpus: Iterable[int], compute_tids: Callable[[], Iterable[int]],
                 cgroup_stat: Path | None = None) -> None:
        self.cpus = tuple(cpus)
        self.compute_tids = compute_tids
        self.cgroup_stat = cgroup_stat
        self.available = Path("/proc/stat").exists() and Path("/proc/self/task").exists()
        self.niced_free = niced_neighbours_yield()

    def __call__(self, now: float) -> CpuSample:
        """The counters now."""
        if not self.available:
            return CpuSample(now, 0.0, 0.0, 0.0)
        try:
            idle = parse_proc_stat_idle(Path("/proc/stat").read_text(), self.cpus, self.niced_free)
        except OSError:
            idle = 0.0
        wait, switches = 0.0, 0
        for tid in self.compute_tids():
            try:
                w, n = parse_schedstat(Path(f"/proc/self/task/{tid}/schedstat").read_text())
            except (OSError, ValueError):
                continue  # a thread that ended between the listing and the read
            wait += w
            switches += n
        throttled = 0.0
        if self.cgroup_stat is not None:
            try:
                throttled = parse_throttled(self.cgroup_stat.read_text())
            except (OSError, ValueError):
                pass
        return CpuSample(now, idle, wait, throttled, switches)


def niced_neighbours_yield() -> bool:
    """Whether niced processes' CPU time is as good as free to this process: it runs at nice
    0 or below (to a niced process they are peers, and its own time is in that column), and
    the kernel's autogroups are off (with them, nice weighs only within one session)."""
    if not hasattr(os, "getpriority") or os.getpriority(os.PRIO_PROCESS, 0) > 0:
        return False
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "0"
    except OSError:
        return True  # no autogroup support: nice weighs across the machine


def compute_thread_ids(engine_tid: int) -> list[int]:
    """Threads that compute: this process's threads but its other Python threads (HTTP,
    drain, grammar workers), i.e. the engine thread and the native pools (OpenMP workers)."""
    others = {t.native_id for t in threading.enumerate() if t.native_id != engine_tid}
    try:
        tids = [int(n) for n in os.listdir("/proc/self/task")]
    except OSError:
        return [engine_tid]
    return [t for t in tids if t not in others]


def cgroup_stat_path(proc_cgroup: str | None = None, root: Path = Path("/sys/fs/cgroup")
                     ) -> Path | None:
    """The innermost cgroup ``cpu.stat`` with throttling counters, or None."""
    proc_cgroup = proc_cgroup if proc_cgroup is not None else _own_cgroups()
    if proc_cgroup is None:
        return None
    for d in cgroup_dirs(proc_cgroup, root):
        p = d / "cpu.stat"
        try:
            if p.exists() and "throttled" in p.read_text():
                return p
        except OSError:
            continue
    return None
