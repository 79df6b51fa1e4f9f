"""The compute-thread governor: its ceiling, its readings and its decisions (no processes here;
tests/integration/test_threads_neighbour.py runs it against a real busy process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from strata.engine.cpu_readings import (
    CpuReading,
    CpuSample,
    cgroup_dirs,
    parse_cfs_quota,
    parse_cpu_max,
    parse_proc_stat_idle,
    parse_schedstat,
    parse_throttled,
    read_quota_cores,
    usable_cores,
)
from strata.engine.threads import (
    GovernorConfig,
    GovernorState,
    ThreadGovernor,
    decide,
    starting_threads,
)

CFG = GovernorConfig()


def reading(idle: float = 0.0, wait: float = 0.0, throttled: float = 0.0,
            wall: float = 0.5, per_switch_s: float = 0.002) -> CpuReading:
    return CpuReading(wall, idle, wait, throttled, per_switch_s)


# ---------------------------------------------------------------- ceiling


def test_quota_files_parse_to_cores() -> None:
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cfs_quota("-1\n", "100000\n") is None
    assert parse_cfs_quota("50000\n", "100000\n") == 0.5


def test_ceiling_is_the_tightest_of_affinity_quota_and_start_count() -> None:
    assert usable_cores(8, None, None) == 8
    assert usable_cores(8, 2.5, None) == 2  # a quota is rounded down: no throttled thread
    assert usable_cores(8, 0.5, None) == 1
    assert usable_cores(8, 4.0, 3) == 3  # OMP_NUM_THREADS / a platform's share
    assert usable_cores(2, 16.0, None) == 2


def test_quota_is_read_from_the_process_cgroup_or_an_ancestor(tmp_path: Path) -> None:
    pod = tmp_path / "kubepods" / "pod1" / "ctr"
    pod.mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    (pod / "cpu.max").write_text("max 100000\n")
    assert read_quota_cores("0::/kubepods/pod1/ctr\n", tmp_path) == 1.5
    assert read_quota_cores("0::/\n", tmp_path) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    d = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text("200000\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    text = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n"
    assert cgroup_dirs(text, tmp_path)[0] == d
    assert read_quota_cores(text, tmp_path) == 2.0


# ---------------------------------------------------------------- readings

STAT = """cpu  500 40 100 1000 20 0 0 7 0 0
cpu0 200 10 50 400 10 0 0 3 0 0
cpu1 300 30 50 600 10 0 0 4 0 0
intr 1 2 3
"""


def test_proc_stat_idle_counts_the_allowed_cpus_in_seconds() -> None:
    tck = parse_proc_stat_idle("cpu0 0 0 0 1 0 0 0 0 0 0\n", [0])  # one tick, in seconds
    assert parse_proc_stat_idle(STAT, [0, 1]) == pytest.approx((410 + 610) * tck)
    assert parse_proc_stat_idle(STAT, [1]) == pytest.approx(610 * tck)
    assert parse_proc_stat_idle(STAT, [1], niced_free=True) == pytest.approx(640 * tck)


def test_schedstat_and_throttling_counters() -> None:
    assert parse_schedstat("123456789 2500000000 42\n") == (2.5, 42)
    assert parse_throttled("usage_usec 10\nnr_throttled 3\nthrottled_usec 250000\n") == 0.25
    assert parse_throttled("nr_periods 9\nnr_throttled 1\nthrottled_time 500000000\n") == 0.5
    r = CpuReading.between(CpuSample(10.0, 4.0, 1.0, 0.0, 100), CpuSample(10.5, 4.4, 1.25, 0.0, 200))
    assert (r.wall_s, round(r.idle_cores, 6), round(r.wait_cores, 6)) == (0.5, 0.8, 0.5)
    assert r.wait_per_switch_s == pytest.approx(0.0025) and r.long_waits


# ---------------------------------------------------------------- decisions


def test_a_neighbour_on_one_core_drops_a_thread() -> None:
    s = decide(GovernorState(threads=2, cap=2), reading(wait=0.5), now=1.0)
    assert s.threads == 1 and "waited" in s.reason


def test_waiting_of_several_cores_drops_several_threads() -> None:
    s = decide(GovernorState(threads=16, cap=16), reading(wait=4.2), now=1.0)
    assert s.threads == 11


def test_throttling_by_the_quota_drops_a_thread() -> None:
    s = decide(GovernorState(threads=4, cap=4), reading(throttled=0.3), now=1.0)
    assert s.threads == 3 and "throttled" in s.reason


def test_a_quiet_machine_keeps_the_count_and_small_waits_are_noise() -> None:
    s = GovernorState(threads=2, cap=2)
    for t in range(10):
        s = decide(s, reading(wait=0.02, idle=0.0), now=float(t))
    assert s.threads == 2


def test_brief_preemptions_by_a_client_keep_the_count_until_they_add_up() -> None:
    brief = 0.0001  # 100 us per switch-in: HTTP or a client waking, not a CPU-bound neighbour
    s = decide(GovernorState(threads=2, cap=2), reading(wait=0.2, per_switch_s=brief), now=1.0)
    assert s.threads == 2
    s = decide(s, reading(wait=0.5, per_switch_s=brief), now=2.0)
    assert s.threads == 1


def test_one_thread_stays_while_no_core_is_idle() -> None:
    s = GovernorState(threads=1, cap=2)
    for t in range(20):
        s = decide(s, reading(idle=0.1, wait=0.3), now=float(t))
    assert s.threads == 1


def test_an_idle_core_brings_the_thread_back_after_two_windows() -> None:
    s = GovernorState(threads=1, cap=2)
    s = decide(s, reading(idle=0.95), now=10.0)
    assert s.threads == 1
    s = decide(s, reading(idle=0.95), now=10.5)
    assert s.threads == 2 and s.raised_at == 10.5


def test_a_failed_probe_backs_off_doubling_and_a_held_one_resets() -> None:
    s = GovernorState(threads=1, cap=2)
    now = 0.0
    gaps = []
    for _ in range(4):
        # Idle until it probes up, then the neighbour shows again: back down.
        while s.threads == 1:
            now += 0.5
            s = decide(s, reading(idle=0.9), now)
        raised = now
        now += 0.5
        s = decide(s, reading(wait=0.5), now)
        assert s.threads == 1
        gaps.append(s.next_probe_at - now)
        assert raised is not None
    assert gaps == [2.0, 4.0, 8.0, 16.0]
    while s.threads == 1:
        now += 0.5
        s = decide(s, reading(idle=0.9), now)
    for _ in range(12):  # it holds for longer than settle_s
        now += 0.5
        s = decide(s, reading(wait=0.01), now)
    assert s.threads == 2 and s.backoff_s == 0.0


def test_short_windows_decide_nothing() -> None:
    s = GovernorState(threads=2, cap=2)
    assert decide(s, reading(wait=1.0, wall=0.05), now=1.0) == s


def test_never_above_the_ceiling() -> None:
    s = GovernorState(threads=3, cap=4)
    for t in range(6):
        s = decide(s, reading(idle=3.0), now=float(t))
    assert s.threads == 4


# ---------------------------------------------------------------- the actuator


def test_governor_applies_changes_at_most_once_per_interval() -> None:
    clock = [0.0]
    wait = [0.0]
    applied: list[int] = []

    def sampler(now: float) -> CpuSample:
        return CpuSample(now, 0.0, wait[0], 0.0)

    g = ThreadGovernor(2, interval_s=0.5, sampler=sampler, set_threads=applied.append,
                       clock=lambda: clock[0])
    g.tick()  # first sample
    clock[0], wait[0] = 0.2, 0.5
    g.tick()  # within the interval: nothing read
    assert g.threads == 2
    clock[0], wait[0] = 0.6, 0.3  # 0.3 thread-s waited over 0.6 s
    g.tick()
    assert g.threads == 1 and applied == [1]
    clock[0] = 10.0  # an idle spell: the next window starts afresh
    g.tick()
    assert applied == [1]


def test_pinned_count_never_changes() -> None:
    g = ThreadGovernor(2, fixed=True, sampler=lambda now: CpuSample(now, 0, now, 0),
                       set_threads=lambda n: None, clock=lambda: 1.0)
    for _ in range(3):
        g.tick()
    assert g.threads == 2


def test_start_up_runs_on_the_cores_idle_now() -> None:
    assert starting_threads(2, 0.9) == 2  # this process holds one core, the other is idle
    assert starting_threads(2, 0.2) == 1  # another process holds the other core
    assert starting_threads(8, 3.0) == 4
    assert starting_threads(2, 5.0) == 2 and starting_threads(4, None) == 4


def test_the_ceiling_is_the_start_count_not_torchs_current_one(monkeypatch) -> None:
    """An earlier engine's governor in the same process may have lowered torch's count; a
    new engine's ceiling is still what the process was started with."""
    import torch

    from strata.engine.threads import governor_for, omp_threads_env

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert omp_threads_env() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")
    assert omp_threads_env() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert omp_threads_env() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        gov = governor_for(None)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert gov.state.cap == usable_cores(cpus, read_quota_cores(), None)
    finally:
        torch.set_num_threads(before)
