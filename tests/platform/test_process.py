"""Launching, sizing, restarting and choosing replicas: the loop-free parts of the platform."""

from __future__ import annotations

import os
import sys

import pytest

from strata.config import parse_cluster_config
from strata.platform import guard
from strata.platform.base import Replica
from strata.platform.process import (
    ProcessSpec,
    engine_spec,
    guarded,
    pick_victims,
    restart_delay,
    threads_per_replica,
)


def test_threads_are_the_cores_divided_by_the_most_replicas_that_may_run() -> None:
    assert threads_per_replica(2, 2) == 1
    assert threads_per_replica(16, 4) == 4
    assert threads_per_replica(16, 3) == 5
    assert threads_per_replica(2, 8) == 1  # never zero
    assert threads_per_replica(8, 0) == 8


def test_restart_delay_doubles_per_crash_and_is_capped() -> None:
    assert [restart_delay(n, 1.0, 10.0) for n in range(6)] == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert restart_delay(3, 0.5, 60.0) == 2.0


def rep(rid: str, phase: str, started: float, ready: float | None = None) -> Replica:
    return Replica(tier="engine", replica_id=rid, phase=phase,  # type: ignore[arg-type]
                   url=None, started_at=started, ready_at=ready)


def test_victims_are_non_serving_first_then_the_most_recently_ready() -> None:
    replicas = [rep("old", "ready", 0, 10), rep("new", "ready", 5, 50),
                rep("mid", "ready", 2, 30), rep("boot", "starting", 60),
                rep("crashed", "backoff", 1), rep("going", "draining", 0, 5)]
    assert pick_victims(replicas, 1) == ["crashed"]
    assert pick_victims(replicas, 2) == ["crashed", "boot"]
    assert pick_victims(replicas, 4) == ["crashed", "boot", "new", "mid"]
    assert pick_victims(replicas, 9) == ["crashed", "boot", "new", "mid", "old"]  # never "going"
    assert pick_victims(replicas, 0) == []


def test_engine_command_carries_the_cluster_files_options() -> None:
    cfg = parse_cluster_config({
        "model": {"path": "/m/x.gguf", "served_model_name": "x"},
        "engine": {"dtype": "float32", "kv_cache": "64MiB", "max_num_seqs": 8,
                   "max_model_len": 1024, "prefix_caching": False},
        "tiers": {"engine": {"autoscaling": {"policy": "llm", "max_replicas": 4}}},
    })
    spec = engine_spec(cfg, "engine", cores=8)
    assert spec.threads == 2  # 8 cores / at most 4 replicas
    argv = spec.argv("127.0.0.1", 4321)
    assert argv[:4] == [sys.executable, "-m", "strata.cli", "engine"]
    assert "--no-prefix-caching" in argv and "--kv-cache-dtype" not in argv  # auto: unsaid
    valued = [a for a in argv[4:] if a != "--no-prefix-caching"]
    flags = dict(zip(valued[::2], valued[1::2], strict=True))
    assert flags["--port"] == "4321" and flags["--host"] == "127.0.0.1"
    assert "--threads" not in flags and flags["--dtype"] == "float32"  # a ceiling, not a pin
    assert flags["--kv-cache"] == str(64 << 20) and flags["--max-num-seqs"] == "8"
    assert flags["--model"] == "/m/x.gguf" and flags["--served-model-name"] == "x"
    assert flags["--max-model-len"] == "1024"
    env = spec.environment({"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "2" and env["PATH"] == "/bin"


def test_explicit_threads_win_and_default_model_is_not_passed() -> None:
    spec = engine_spec(parse_cluster_config({"engine": {"threads": 3}}), "engine", cores=64)
    assert spec.threads == 3
    argv = spec.argv("127.0.0.1", 1)
    assert "--model" not in argv and argv[argv.index("--threads") + 1] == "3"  # pinned


def test_guarded_command_names_this_process_as_the_parent() -> None:
    argv = guarded(["echo", "hi"])
    assert argv[1:4] == ["-m", "strata.platform.guard", str(os.getpid())]
    assert argv[4:] == ["--", "echo", "hi"]
    with pytest.raises(SystemExit) as info:
        guard.main(["not-a-pid", "--", "echo"])
    assert info.value.code == 2


def test_process_spec_env_overrides_come_last() -> None:
    spec = ProcessSpec(argv=lambda h, p: [], threads=1, env={"OMP_NUM_THREADS": "7"})
    assert spec.environment({})["OMP_NUM_THREADS"] == "7"
