"""The pieces of running replicas as local processes that need no event loop.

How a replica is launched (``ProcessSpec``, ``engine_spec``), how the machine's cores are
shared (``threads_per_replica``), how long to wait before restarting a crashed replica
(``restart_delay``), which replicas a scale-down removes (``pick_victims``), and the
process-group plumbing that leaves no orphans (``kill_group``).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from strata.config import ClusterConfig
from strata.platform.base import Replica

# Argument vector of one replica process, given its bind host and port.
Argv = Callable[[str, int], list[str]]


@dataclass(frozen=True)
class ProcessSpec:
    """How to launch one replica of a tier: its command, threads and environment."""

    argv: Argv
    threads: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    # A draining replica is idle only once this also says so (given its URL): e.g. a stage
    # replica's head still has sequences pinned to it. None: its own /load decides.
    drained: Callable[[str], Awaitable[bool]] | None = None

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """The child's environment: ``base`` plus thread caps and unbuffered output."""
        t = str(self.threads)
        return {**base, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
                "PYTHONUNBUFFERED": "1", **self.env}


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_replica(cores: int, replicas: int) -> int:
    """Torch threads for each of ``replicas`` processes sharing ``cores`` cores.

    Replicas are sized for the most that may run at once, so a scale-up never
    oversubscribes the cores (an oversubscribed matmul pool is slower than a smaller one).
    """
    return max(1, cores // max(1, replicas))


def restart_delay(crash_streak: int, base_s: float, cap_s: float) -> float:
    """Seconds before the next start after ``crash_streak`` consecutive crashes (0: none)."""
    if crash_streak <= 0:
        return 0.0
    return min(cap_s, base_s * 2.0 ** (crash_streak - 1))


def pick_victims(replicas: Sequence[Replica], count: int) -> list[str]:
    """The ``count`` replicas a scale-down removes, as a Kubernetes ReplicaSet picks pods.

    Replicas that do not serve go first (crashed, starting, unready: they cost nothing to
    drop), newest first; then ready ones, the most recently ready first, since a long-lived
    replica holds the warmest prefix cache.
    """
    if count <= 0:
        return []
    rank = {"backoff": 0, "starting": 1, "unready": 2, "ready": 3}

    def key(r: Replica) -> tuple[int, float]:
        newest = -(r.ready_at if r.ready_at is not None else r.started_at)
        return rank.get(r.phase, 0), newest

    live = [r for r in replicas if not r.terminating]
    return [r.replica_id for r in sorted(live, key=key)[:count]]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (the replica binds it moments later; a lost race is a crash
    that the restart path retries on a new port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def guarded(argv: list[str]) -> list[str]:
    """``argv`` wrapped so the process dies with this one (``strata.platform.guard``)."""
    return [sys.executable, "-m", "strata.platform.guard", str(os.getpid()), "--", *argv]


def engine_spec(config: ClusterConfig, tier: str, cores: int | None = None) -> ProcessSpec:
    """``strata engine`` for ``tier`` with the tier's model and engine options."""
    opts = config.engine_for(tier)
    total_max = sum(t.max_replicas for t in config.tiers.values())
    threads = opts.threads or threads_per_replica(cores or available_cores(), total_max)
    model = config.model_for(tier)

    def argv(host: str, port: int) -> list[str]:
        # A share of the cores is the engine's ceiling (OMP_NUM_THREADS, see ProcessSpec): it
        # runs fewer threads while other processes hold cores; --threads would pin the count.
        pinned = ["--threads", str(threads)] if opts.threads else []
        cmd = [sys.executable, "-m", "strata.cli", "engine", "--host", host, "--port", str(port),
               *pinned, "--dtype", opts.dtype, "--device", opts.device,
               *opts.kv_and_batch_args(), *opts.lora_args(), *opts.tool_args(),
               # The platform's SIGKILL comes stop_timeout_s after this drain (see local).
               "--drain-timeout-s", str(config.platform.drain_timeout_s),
               "--log-level", "warning"]
        if model.path is not None:
            cmd += ["--model", model.path]
        if model.served_model_name is not None:
            cmd += ["--served-model-name", model.served_model_name]
        if opts.kv_cache_dtype != "auto":
            cmd += ["--kv-cache-dtype", opts.kv_cache_dtype]
        return cmd

    return ProcessSpec(argv=argv, threads=threads)


def kill_group(pid: int, sig: signal.Signals) -> bool:
    """Signal the process group led by ``pid``; False when it no longer exists."""
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # the group leader's pid was reused by someone else's process
        return False


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a replica's log, to say why it died."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError as err:
        return f"(log {path} unreadable: {err.strerror})"
    return "\n".join(text.splitlines()[-lines:])
