"""A real engine beside a real busy process: its compute threads drop to the free cores while
the neighbour runs and come back once it stops (strata.engine.threads).

The machine may be shared: where other processes leave no core idle, the engine rightly
stays low after the neighbour stops, so that part skips (saying so) when the governor's own
/proc readings showed no idle core, and fails only when there was one and it did not come
back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from strata.engine.engine import EngineConfig, build_engine_core
from strata.engine.metrics import EngineMetrics
from strata.engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
    or not Path("/proc/self/task").exists(), reason="needs Linux and two CPUs")


def _metric_threads(metrics: EngineMetrics) -> int:
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        if family.name == "strata_engine_compute_threads":
            return int(family.samples[0].value)
    raise AssertionError("no strata_engine_compute_threads on /metrics")


def test_threads_follow_a_busy_neighbour(tiny_hf_dir: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    core = build_engine_core(EngineConfig(model=str(tiny_hf_dir), dtype="float32", device="cpu",
                                          num_kv_blocks=256, max_num_seqs=4, max_model_len=2048))
    gov = core.threads
    assert gov is not None and not gov.fixed
    cap = gov.state.cap
    assert cap == min(len(cpus), gov.state.cap) and cap >= 2
    metrics = EngineMetrics(core)
    ids = core.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)
    stop = threading.Event()
    n = [0]

    def loop() -> None:  # the engine thread: keeps four sequences decoding
        while not stop.is_set():
            while len(core.states) < 4:
                core.add(n[0], ids, SamplingParams(max_tokens=400, temperature=0.0,
                                                   ignore_eos=True), time.monotonic())
                n[0] += 1
            core.step()

    def wait_for(pred, timeout_s: float) -> tuple[bool, list]:
        seen = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if gov.reading is not None and (not seen or seen[-1] is not gov.reading):
                seen.append(gov.reading)
            if pred(_metric_threads(metrics)):
                return True, seen
            time.sleep(0.1)
        return False, seen

    def idle_seen(readings: list) -> bool:
        return any(r.idle_cores >= gov.config.idle_up for r in readings)

    # Start from all threads whatever the machine's load now (the governor starts at the
    # cores idle at start-up), so that the drop is the neighbour's doing to observe.
    gov.state = replace(gov.state, threads=cap)
    gov.apply(cap)
    engine = threading.Thread(target=loop, name="test-engine", daemon=True)
    engine.start()
    neighbour = None
    try:
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setaffinity(neighbour.pid, {cpus[-1]})
        ok, seen = wait_for(lambda t: t < cap, 10.0)
        assert ok, f"a busy neighbour on CPU {cpus[-1]} left {cap} threads: {seen[-3:]}"
        neighbour.kill()
        neighbour.wait(timeout=10)
        neighbour = None
        ok, seen = wait_for(lambda t: t == cap, 20.0)
        if not ok and not idle_seen(seen):
            pytest.skip("after the neighbour stopped, other processes left no core idle")
        assert ok, f"the neighbour stopped and cores were idle, but threads stayed low: {seen[-3:]}"
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait(timeout=10)
        stop.set()
        engine.join(timeout=30)
