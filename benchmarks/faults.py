"""Faults under load: kill -9 a part of a running ``strata serve`` mid-stream, and count.

For each target (an engine replica, a stage worker, the stage head, the gateway) the
script starts a real cluster on the bundled SmolLM2-135M, runs a closed-loop load (half
the clients stream, half do not), kills the target with SIGKILL while streams are running
on it, keeps the load going until the killed part is back, and records:

* requests sent and how each ended: ok, a clear error (HTTP error in the OpenAI format or
  an SSE ``error`` event), a connection reset, or lost (a stream closed without ``[DONE]``
  or an error, or a client left hanging until its own timeout). The goal is 0 lost;
* the requests that were in flight at the kill, by how they ended;
* the time until a new request is served again, and until the killed part is back.

A fifth experiment scales an engine tier down while requests run on the leaving replica
(the real autoscaler decides it when the load drops): every request must still succeed.

``strata serve`` runs the gateway, the platform and the autoscaler in one process whose
replicas die with it, so killing "the gateway" kills the whole cluster; nothing in strata
restarts it. The script then starts it again at once, as a process supervisor (systemd
``Restart=always``, a Kubernetes Deployment) would, and reports the time to serve again
from the kill. Usage::

    python benchmarks/faults.py                       # every target, ~6 minutes
    python benchmarks/faults.py --targets engine,gateway
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from reliability import (
    HUNG,
    LOST,
    OK,
    RESET,
    Cluster,
    LoadStats,
    alive,
    closed_loop,
    engine_block,
    machine,
    outcome_dicts,
    probe_until_served,
    table,
    write_result,
)

from strata.cluster import Cluster as StrataCluster
from strata.config import load_cluster_config
from strata.platform.process import free_port

MODEL = "smollm2"
TARGETS = ("engine", "stage_worker", "stage_head", "gateway", "scale_down")


def engine_cluster(workdir: Path, replicas: int = 2,
                   autoscaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """An engine tier of ``replicas`` (fixed unless ``autoscaling``), fast crash restarts."""
    tier: dict[str, Any] = {"replicas": replicas}
    if autoscaling is not None:
        tier["autoscaling"] = autoscaling
    return {
        "model": {"served_model_name": MODEL},
        "engine": engine_block(),
        "tiers": {"engine": tier},
        "autoscaler": {"period_s": 1, "window_s": 10},
        "gateway": {"port": free_port(), "health_interval_s": 0.5, "poll_interval_s": 0.2},
        "platform": {"log_dir": str(workdir / "replicas"), "restart_backoff_s": 0.5,
                     "health_interval_s": 0.2, "drain_timeout_s": 120},
    }


def stage_cluster(workdir: Path) -> dict[str, Any]:
    """A two-stage pipeline (head 0:15, two replicas of 15:30)."""
    return {
        "model": {"served_model_name": MODEL},
        "engine": {"threads": 1, "dtype": "float32", "num_kv_blocks": 256,
                   "max_model_len": 1024, "max_num_seqs": 16},
        "tiers": {"pipeline": {"stages": [
            {"layers": "0:15"},
            {"layers": "15:30", "replicas": 2, "min_replicas": 2, "max_replicas": 2}]}},
        "autoscaler": {"period_s": 3600},
        "gateway": {"port": free_port(), "health_interval_s": 0.5, "poll_interval_s": 0.2},
        "platform": {"log_dir": str(workdir / "replicas"), "restart_backoff_s": 0.5,
                     "health_interval_s": 0.2, "drain_timeout_s": 120},
    }


Victim = tuple[int, str | None, str]  # pid, replica id to watch for its return, label


async def _wait(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if await asyncio.to_thread(check):
                return True
        except Exception:  # noqa: BLE001 - the cluster may be restarting: keep asking
            pass
        await asyncio.sleep(0.2)
    return False


def _busy_replica(stats: LoadStats, cluster: Cluster, tier: str) -> dict[str, Any] | None:
    """A replica of ``tier`` with a stream in flight that has sent tokens already."""
    reps = [r for r in cluster.replicas() if r["tier"] == tier and r["phase"] == "ready"]
    streaming = {o.replica for o in list(stats.in_flight.values())
                 if o.stream and o.tokens >= 2}
    return next((r for r in reps if r["url"] in streaming), None)


async def run_kill(name: str, cluster: Cluster, ready: dict[str, int],
                   pick: Callable[[LoadStats], Victim | None], *, workers: int,
                   max_tokens: int, restart_gateway: bool = False) -> dict[str, Any]:
    """Load, kill the picked process mid-stream, wait for its return, stop the load."""
    stats = LoadStats()
    stop = asyncio.Event()
    t0 = time.perf_counter()
    load = asyncio.create_task(closed_loop(cluster.url, workers, stop, stats, t0,
                                           max_tokens=max_tokens, model=MODEL, timeout_s=90))
    victim: Victim | None = None
    deadline = time.monotonic() + 60
    await asyncio.sleep(3.0)
    while victim is None and time.monotonic() < deadline:
        victim = await asyncio.to_thread(pick, stats)
        if victim is None:
            await asyncio.sleep(0.1)
    if victim is None:
        stop.set()
        await load
        raise RuntimeError(f"{name}: no target with a stream in flight within 60 s")
    pid, replica_id, label = victim
    restarts_before = {r["id"]: r.get("restarts", 0) for r in cluster.replicas()}
    in_flight_at_kill = {i for i, o in stats.in_flight.items()}
    streams_at_kill = sum(1 for o in stats.in_flight.values() if o.stream and o.tokens > 0)
    os.kill(pid, signal.SIGKILL)
    t_kill = time.perf_counter() - t0
    print(f"[{name}] killed {label} (pid {pid}) at {t_kill:.1f} s with "
          f"{len(in_flight_at_kill)} requests in flight ({streams_at_kill} streams mid-way)")
    relaunched_at = None
    if restart_gateway:
        await asyncio.sleep(0.5)  # a supervisor notices the exit
        relaunched_at = time.perf_counter() - t0
        await asyncio.to_thread(cluster.launch)
    served = asyncio.create_task(probe_until_served(cluster.url, t_kill, t0, 300, MODEL))

    def back() -> bool:
        if restart_gateway:
            tier = cluster.status()["tiers"][0]
            return bool(tier["ready"] >= ready[tier["name"]])
        # Restarted (the count moved: a status row can lag behind the kill), ready, and
        # for a stage worker joined to the head again.
        return any(r["id"] == replica_id and r["pid"] not in (None, pid)
                   and r["restarts"] > restarts_before.get(replica_id, 0)
                   and r["phase"] == "ready" and r.get("head_state", "live") == "live"
                   for r in cluster.replicas())

    returned = await _wait(back, 300)
    t_back = time.perf_counter() - t0 - t_kill if returned else None
    if returned:
        try:
            await asyncio.to_thread(cluster.wait_ready, ready, 120)
        except (TimeoutError, RuntimeError) as err:
            print(f"[{name}] not fully ready again: {err}")
    await asyncio.sleep(5.0)  # load on the recovered cluster
    stop.set()
    await load
    serve_s = await served
    at_kill = [o for o in stats.outcomes if o.index in in_flight_at_kill]
    after = [o for o in stats.outcomes if o.start_s > t_kill]
    counts = stats.counts()
    lost = sum(counts[k] for k in LOST)
    unclear_resets = 0 if restart_gateway else counts[RESET]
    result = {
        "target": name, "killed": label, "t_kill_s": t_kill, "counts": counts,
        "lost": lost + unclear_resets, "hung": counts[HUNG],
        "in_flight_at_kill": len(in_flight_at_kill),
        "at_kill": _kinds(at_kill), "after_kill": _kinds(after),
        "streams_mid_way_at_kill": streams_at_kill,
        "errors_seen": sorted({o.error for o in stats.outcomes if o.error})[:8],
        "serve_again_s": serve_s, "target_back_s": t_back, "relaunched_at_s": relaunched_at,
        "outcomes": outcome_dicts(stats.outcomes),
    }
    print(f"[{name}] {counts}; in flight at the kill: {result['at_kill']}; served again "
          f"after {serve_s} s; back after {t_back} s")
    return result


def _kinds(outcomes: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes:
        key = f"{o.kind}{'' if o.stream else ' (non-stream)'}"
        out[key] = out.get(key, 0) + 1
    return out


async def engine_fault(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    cluster = Cluster(engine_cluster(workdir), workdir, "engine")
    cluster.start({"engine": 2})
    try:
        def pick(stats: LoadStats) -> Victim | None:
            r = _busy_replica(stats, cluster, "engine")
            return (r["pid"], r["id"], f"engine replica {r['id']}") if r else None
        return await run_kill("engine", cluster, {"engine": 2}, pick, workers=args.workers,
                              max_tokens=args.max_tokens)
    finally:
        cluster.stop()


async def stage_faults(workdir: Path, args: argparse.Namespace,
                       targets: list[str]) -> list[dict[str, Any]]:
    cluster = Cluster(stage_cluster(workdir), workdir, "stages")
    ready = {"pipeline": 1, "stage-15-30": 2}
    cluster.start(ready)
    results = []
    try:
        if "stage_worker" in targets:
            def worker(stats: LoadStats) -> Victim | None:
                reps = [r for r in cluster.replicas() if r["tier"] == "stage-15-30"
                        and (r.get("running") or 0) > 0 and r["phase"] == "ready"]
                mid = any(o.stream and o.tokens >= 2 for o in stats.in_flight.values())
                if reps and mid:
                    r = max(reps, key=lambda x: x["running"])
                    return r["pid"], r["id"], f"stage worker {r['id']} (15:30)"
                return None
            results.append(await run_kill("stage_worker", cluster, ready, worker,
                                          workers=args.workers, max_tokens=args.max_tokens))
        if "stage_head" in targets:
            def head(stats: LoadStats) -> Victim | None:
                mid = any(o.stream and o.tokens >= 2 for o in stats.in_flight.values())
                reps = [r for r in cluster.replicas() if r["tier"] == "pipeline"]
                if reps and mid and reps[0]["pid"]:
                    return reps[0]["pid"], reps[0]["id"], f"stage head {reps[0]['id']} (0:15)"
                return None
            results.append(await run_kill("stage_head", cluster, ready, head,
                                          workers=args.workers, max_tokens=args.max_tokens))
    finally:
        cluster.stop()
    return results


async def gateway_fault(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    cluster = Cluster(engine_cluster(workdir), workdir, "gateway")
    cluster.start({"engine": 2})
    children = [p for k, p in cluster.pids().items() if k != "gateway"]
    try:
        def pick(stats: LoadStats) -> Victim | None:
            mid = any(o.stream and o.tokens >= 2 for o in stats.in_flight.values())
            return (cluster.pid, None, "strata serve (gateway + platform + autoscaler)") \
                if mid else None
        result = await run_kill("gateway", cluster, {"engine": 2}, pick, workers=args.workers,
                                max_tokens=args.max_tokens, restart_gateway=True)
    finally:
        cluster.stop()
    orphans = [p for p in children if alive(p)]
    for p in orphans:  # none expected: replicas die with the cluster process
        os.kill(p, signal.SIGKILL)
    result["replicas_outlived_the_kill"] = len(orphans)
    return result


class InProcess:
    """A strata Cluster (the very object ``strata serve`` runs) on its own event-loop thread,
    so the experiment can call ``platform.scale`` the way the autoscaler does, at the moment
    the leaving replica holds requests."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        path = workdir / "cluster.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        self.cluster = StrataCluster(load_cluster_config(path))
        self.loop = asyncio.new_event_loop()
        self.stop: asyncio.Event | None = None
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.stop = asyncio.Event()
            self.loop.run_until_complete(self.cluster.run(self.stop, lambda _: started.set()))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not started.wait(120):
            raise RuntimeError("the cluster did not start")

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(90)


async def scale_down(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Two replicas under 8 clients; the tier is scaled to one (``platform.scale``, what
    the autoscaler calls) while requests run on the replica that leaves (the newest): they
    must all finish there, and nothing may fail."""
    config = engine_cluster(workdir, 2)
    config["autoscaler"] = {"period_s": 3600}
    running = InProcess(config, workdir)
    c = running.cluster
    stats = LoadStats()
    t0 = time.perf_counter()
    stop = asyncio.Event()
    drained: dict[str, Any] = {}
    t_two = t_drain = t_gone = None
    try:
        await _wait(lambda: len(c.platform.endpoints("engine")) == 2, 300)
        t_two = time.perf_counter() - t0
        load = asyncio.create_task(closed_loop(c.url, args.workers, stop, stats, t0,
                                               max_tokens=args.max_tokens, model=MODEL,
                                               timeout_s=300))
        victim = max(c.platform.replicas("engine"), key=lambda x: x.ready_at or 0.0)

        def busy() -> bool:
            g = c.gateway.replicas.replicas.get(victim.url or "")
            return g is not None and g.in_flight >= 2
        await _wait(busy, 60)
        drained.update(id=victim.replica_id, url=victim.url)
        t_drain = time.perf_counter() - t0
        await asyncio.to_thread(running.call, c.platform.scale("engine", 1))
        gone = await _wait(lambda: len(c.platform.replicas("engine")) == 1, 180)
        t_gone = time.perf_counter() - t0 if gone else None
        await asyncio.sleep(3)
        stop.set()
        await load
    finally:
        await asyncio.to_thread(running.close)
    # In flight at the decision and answered by the leaving replica (a non-streamed
    # answer names its replica only in the final headers, so this is read afterwards).
    in_flight_on_victim = [o.index for o in stats.outcomes if t_drain is not None
                           and o.start_s < t_drain < o.end_s
                           and o.replica == drained.get("url")]
    counts = stats.counts()
    on_victim = [o for o in stats.outcomes if o.index in in_flight_on_victim]
    result = {
        "target": "scale_down", "counts": counts,
        "lost": sum(counts[k] for k in LOST) + counts[RESET],
        "hung": counts[HUNG], "two_replicas_ready_at_s": t_two,
        "scaled_down_at_s": t_drain,
        "replica_gone_at_s": t_gone, "drained_replica": drained.get("id"),
        "in_flight_on_drained_replica": len(in_flight_on_victim),
        "their_endings": _kinds(on_victim),
        "errors_seen": sorted({o.error for o in stats.outcomes if o.error})[:8],
        "outcomes": outcome_dicts(stats.outcomes),
    }
    print(f"[scale_down] {counts}; draining at {t_drain}; {len(in_flight_on_victim)} "
          f"requests in flight on the drained replica: {result['their_endings']}")
    return result


def summary_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        c = r["counts"]
        clear = c["http_error"] + c["sse_error"]
        rows.append([r["target"], c["sent"], c[OK], clear, c[RESET], r["lost"], r["hung"],
                     ", ".join(f"{k} {v}" for k, v in sorted(r.get("at_kill",
                                                                   r.get("their_endings",
                                                                         {})).items())),
                     r.get("serve_again_s"), r.get("target_back_s")])
    return table(["target", "sent", "ok", "clear error", "reset", "lost", "hung",
                  "in flight at the fault: ending", "serve again s", "target back s"], rows)


async def main_async(args: argparse.Namespace) -> None:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; choose from {TARGETS}")
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="strata-faults-"))
    print(f"CPU: {info['cpu']} ({info['cores']} cores), load average {info['loadavg']}, "
          f"commit {info['commit']}; logs in {workdir}")
    results: list[dict[str, Any]] = []
    if "engine" in targets:
        results.append(await engine_fault(workdir / "engine", args))
    if {"stage_worker", "stage_head"} & set(targets):
        results += await stage_faults(workdir / "stages", args, targets)
    if "gateway" in targets:
        results.append(await gateway_fault(workdir / "gateway", args))
    if "scale_down" in targets:
        results.append(await scale_down(workdir / "scale_down", args))
    md = summary_table(results)
    print(md)
    info_end = machine()
    path = write_result(args.name, {"machine": info, "loadavg_end": info_end["loadavg"],
                                    "args": vars(args), "results": results, "table": md})
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--workers", type=int, default=8, help="closed-loop clients")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--name", default="faults", help="result file name (results/reliability/)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
