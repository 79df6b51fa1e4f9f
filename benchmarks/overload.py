"""Overload: offer 3x the measured capacity of a ``strata serve`` cluster for minutes.

Steps, all against one real cluster (the bundled SmolLM2-135M, one engine replica of one
torch thread, the gateway's bounded admission set in the cluster file):

1. capacity: a closed loop of ``--max-in-flight`` clients for ``--capacity-s`` seconds;
   completed requests per second is the capacity of this workload on this machine;
2. baseline: sequential requests, their TTFT;
3. overload: an open loop (Poisson arrivals) at ``--factor`` x capacity for
   ``--duration-s``, while the RSS of the gateway and the engine is sampled every 2 s;
4. recovery: 10 s of quiet, then sequential requests again, against the baseline.

What counts: memory stays bounded (no growth across the run), the excess is refused
early with 429/503 and a Retry-After header, the admitted requests' p99 TTFT stays within
the SLO (``slos.ttft_s`` of the cluster file), nothing hangs, and latency returns to the
baseline afterwards. ``--no-limits`` runs the same load with the gateway's default
admission (no in-flight bound) to show what the bound is for. Usage::

    python benchmarks/overload.py                   # 5 minutes of overload
    python benchmarks/overload.py --duration-s 60   # a shorter variant
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from reliability import (
    HTTP_ERROR,
    LOST,
    OK,
    Cluster,
    LoadStats,
    client_session,
    closed_loop,
    engine_block,
    machine,
    percentile,
    proc_sample,
    send,
    table,
    write_result,
)

from strata.platform.process import free_port

MODEL = "smollm2"


def cluster_config(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One engine replica; the gateway admits ``max_in_flight`` and queues a few more."""
    gateway: dict[str, Any] = {"port": free_port()}
    if not args.no_limits:
        gateway.update(max_in_flight_per_model=args.max_in_flight,
                       max_queued_per_model=args.max_queued,
                       queue_timeout_s=args.queue_timeout_s)
    return {
        "model": {"served_model_name": MODEL},
        "engine": engine_block(max_num_seqs=max(16, args.max_in_flight)),
        "tiers": {"engine": {"replicas": 1}},
        "slos": {"ttft_s": args.ttft_slo_s},
        "gateway": gateway,
        "platform": {"log_dir": str(workdir / "replicas")},
    }


async def sequential(url: str, n: int, max_tokens: int) -> list[float]:
    """TTFTs of ``n`` streamed requests sent one after another."""
    t0 = time.perf_counter()
    out = []
    async with client_session() as session:
        for i in range(n):
            o = await send(session, url, i, t0, stream=True, max_tokens=max_tokens,
                           model=MODEL, timeout_s=60)
            if o.kind == OK and o.ttft_s is not None:
                out.append(o.ttft_s)
    return out


async def capacity(url: str, clients: int, seconds: float, max_tokens: int) -> float:
    """Completed requests per second with ``clients`` in a closed loop (after a warm-up)."""
    stats = LoadStats()
    stop = asyncio.Event()
    t0 = time.perf_counter()
    task = asyncio.create_task(closed_loop(url, clients, stop, stats, t0,
                                           max_tokens=max_tokens, model=MODEL))
    await asyncio.sleep(5)
    n0, ts = len(stats.outcomes), time.perf_counter()
    await asyncio.sleep(seconds)
    n1, te = len(stats.outcomes), time.perf_counter()
    stop.set()
    await task
    bad = [o for o in stats.outcomes if o.kind != OK]
    if bad:
        print(f"capacity run: {len(bad)} requests did not succeed, e.g. {bad[0].error}")
    return (n1 - n0) / (te - ts)


async def overload(url: str, rate: float, seconds: float, max_tokens: int,
                   pids: dict[str, int], seed: int) -> tuple[LoadStats, list[dict[str, Any]]]:
    """Poisson arrivals at ``rate`` for ``seconds``; memory samples every 2 s."""
    stats = LoadStats()
    samples: list[dict[str, Any]] = []
    rng = random.Random(seed)
    t0 = time.perf_counter()
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            row: dict[str, Any] = {"t_s": time.perf_counter() - t0,
                                   "in_flight": len(stats.in_flight)}
            for name, pid in pids.items():
                s = proc_sample(pid)
                row[name] = s["rss"] if s else None
            samples.append(row)
            try:
                await asyncio.wait_for(done.wait(), 2.0)
            except TimeoutError:
                pass

    sampler = asyncio.create_task(sample())
    async with client_session() as session:
        tasks = []
        next_s = 0.0
        i = 0
        while next_s < seconds:
            delay = t0 + next_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(
                session, url, i, t0, stream=i % 2 == 0, max_tokens=max_tokens, model=MODEL,
                timeout_s=120, stats=stats)))
            i += 1
            next_s += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    done.set()
    await sampler
    return stats, samples


def memory_summary(samples: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per process: RSS at the start, max over the first and the last fifth, and the end."""
    out = {}
    fifth = max(1, len(samples) // 5)
    for n in names:
        vals = [s[n] for s in samples if s.get(n)]
        if not vals:
            continue
        out[n] = {"start_mib": vals[0] / 2**20, "first_fifth_max_mib": max(vals[:fifth]) / 2**20,
                  "last_fifth_max_mib": max(vals[-fifth:]) / 2**20, "max_mib": max(vals) / 2**20,
                  "end_mib": vals[-1] / 2**20}
    return out


async def main_async(args: argparse.Namespace) -> None:
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="strata-overload-"))
    print(f"CPU: {info['cpu']} ({info['cores']} cores), load average {info['loadavg']}, "
          f"commit {info['commit']}; logs in {workdir}")
    cluster = Cluster(cluster_config(args, workdir), workdir, "overload")
    cluster.start({"engine": 1})
    try:
        url = cluster.url
        await sequential(url, 3, args.max_tokens)  # warm-up
        cap = args.capacity or await capacity(url, args.max_in_flight, args.capacity_s,
                                              args.max_tokens)
        print(f"capacity: {cap:.2f} req/s ({args.max_in_flight} clients, "
              f"max_tokens {args.max_tokens})")
        base = await sequential(url, args.probes, args.max_tokens)
        pids = cluster.pids()
        rate = args.factor * cap
        print(f"offering {rate:.2f} req/s for {args.duration_s:g} s ...")
        stats, samples = await overload(url, rate, args.duration_s, args.max_tokens, pids,
                                        args.seed)
        await asyncio.sleep(10)
        after = await sequential(url, args.probes, args.max_tokens)
    finally:
        cluster.stop()
    outcomes = stats.outcomes
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else o.kind
        statuses[key] = statuses.get(key, 0) + 1
    refused = [o for o in outcomes if o.kind == HTTP_ERROR and o.status in (429, 503)]
    admitted = [o for o in outcomes if o.kind == OK]
    ttfts = [o.ttft_s for o in admitted if o.ttft_s is not None]
    counts = stats.counts()
    memory = memory_summary(samples, list(pids))
    result = {
        "machine": info, "loadavg_end": machine()["loadavg"], "args": vars(args),
        "capacity_rps": cap, "offered_rps": rate, "sent": len(outcomes), "counts": counts,
        "lost": sum(counts[k] for k in LOST), "statuses": statuses,
        "refused": len(refused),
        "refused_with_retry_after": sum(1 for o in refused if o.retry_after),
        "refused_latency_p99_ms": (percentile([o.end_s - o.start_s for o in refused], 99)
                                   or 0) * 1000,
        "admitted": len(admitted), "admitted_rps": len(admitted) / args.duration_s,
        "ttft_p50_ms": (percentile(ttfts, 50) or 0) * 1000,
        "ttft_p99_ms": (percentile(ttfts, 99) or 0) * 1000,
        "ttft_slo_ms": args.ttft_slo_s * 1000,
        "baseline_ttft_p50_ms": (percentile(base, 50) or 0) * 1000,
        "after_ttft_p50_ms": (percentile(after, 50) or 0) * 1000,
        "memory": memory, "samples": samples,
        "errors_seen": sorted({o.error for o in outcomes if o.error})[:8],
    }
    rows = [[f"{cap:.2f}", f"{rate:.2f}", len(outcomes),
             ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
             f"{result['refused_with_retry_after']}/{len(refused)}", result["lost"],
             f"{result['ttft_p50_ms']:.0f} / {result['ttft_p99_ms']:.0f}",
             f"{result['ttft_slo_ms']:.0f}",
             f"{result['baseline_ttft_p50_ms']:.0f} -> {result['after_ttft_p50_ms']:.0f}"]]
    md = table(["capacity req/s", "offered req/s", "sent", "statuses", "Retry-After",
                "lost", "admitted TTFT p50 / p99 ms", "SLO ms", "TTFT p50 before -> after ms"],
               rows)
    mem_rows = [[n, m["start_mib"], m["first_fifth_max_mib"], m["last_fifth_max_mib"],
                 m["max_mib"], m["end_mib"]] for n, m in memory.items()]
    md += "\n\n" + table(["process", "RSS start MiB", "max first fifth", "max last fifth",
                          "max", "end"], mem_rows)
    result["table"] = md
    print(md)
    print(f"wrote {write_result(args.name, result)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=300.0)
    p.add_argument("--factor", type=float, default=3.0, help="offered load / capacity")
    p.add_argument("--capacity", type=float, default=None,
                   help="req/s; skips the capacity measurement")
    p.add_argument("--capacity-s", type=float, default=30.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-in-flight", type=int, default=8,
                   help="gateway.max_in_flight_per_model (and the capacity run's clients)")
    p.add_argument("--max-queued", type=int, default=8, help="gateway.max_queued_per_model")
    p.add_argument("--queue-timeout-s", type=float, default=1.0, help="gateway.queue_timeout_s")
    p.add_argument("--ttft-slo-s", type=float, default=2.0, help="slos.ttft_s")
    p.add_argument("--probes", type=int, default=10, help="sequential requests before/after")
    p.add_argument("--no-limits", action="store_true",
                   help="the gateway's default admission (no in-flight bound)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="overload", help="result file name")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
