"""Soak: replay a real trace against ``strata serve`` for 30 minutes, watch for leaks.

A cluster of two engine replicas (bundled SmolLM2-135M, one torch thread each) serves the
Azure conversation trace (lengths scaled by ``--length-factor``; arrivals are the trace's
own, thinned to ``--load`` x the measured capacity). Every 10 s the script samples, for
every cluster process (the ``strata serve`` process that holds the gateway, and each
replica): RSS, open file descriptors, and each engine's KV blocks in use (GET /load).

Leaks show as a difference between the baseline (after a warm-up, idle), the end of the
replay and the same processes after ``--idle-s`` of quiet. Usage::

    python benchmarks/soak.py                              # 30 minutes
    python benchmarks/soak.py --duration-s 120 --name soak-short
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from reliability import (
    Cluster,
    engine_block,
    machine,
    percentile,
    proc_sample,
    table,
    write_result,
)

from strata.bench.client import ClientOptions, RequestSpec, make_client, run_load, send_request
from strata.bench.prompts import PromptSynthesizer, load_bench_tokenizer
from strata.bench.workload import WorkloadOptions, build_specs, build_trace
from strata.platform.process import free_port

MODEL = "smollm2"
TRACE_RATE = 5.53  # azure-conv's mean arrival rate (shared/data/README)


def cluster_config(workdir: Path) -> dict[str, Any]:
    return {
        "model": {"served_model_name": MODEL},
        "engine": engine_block(),
        "tiers": {"engine": {"replicas": 2}},
        "gateway": {"port": free_port()},
        "platform": {"log_dir": str(workdir / "replicas")},
    }


def specs_for(args: argparse.Namespace, window: tuple[float, float | None],
              rate_scale: float, seed: int) -> list[RequestSpec]:
    """The trace window's requests (arrivals thinned by ``rate_scale``) with real prompts."""
    opts = WorkloadOptions(trace=args.trace, data_dir=args.data_dir, window=window,
                           rate_scale=rate_scale, length_factor=args.length_factor,
                           max_context=900, seed=seed)
    trace = build_trace(opts)
    synth = PromptSynthesizer(load_bench_tokenizer(None), seed=seed)
    specs, _ = build_specs(trace, synth, "text")
    return specs


async def capacity(url: str, specs: list[RequestSpec], clients: int, seconds: float) -> float:
    """Completed trace requests per second with ``clients`` in a closed loop."""
    options = ClientOptions(target=url, model=MODEL, timeout_s=120)
    pending = iter(specs)
    done: list[float] = []
    t0 = time.perf_counter()
    async with make_client(options) as session:
        async def worker() -> None:
            for spec in pending:
                if time.perf_counter() - t0 > seconds:
                    return
                rec = await send_request(session, spec, options, t0, closed_loop=True)
                if rec.status == "ok":
                    done.append(time.perf_counter() - t0)
        await asyncio.gather(*(worker() for _ in range(clients)))
    warm = [t for t in done if t > 5]
    return len(warm) / max(1e-9, (max(warm) - 5)) if warm else 0.0


def snapshot(cluster: Cluster) -> dict[str, Any]:
    """RSS and fds of every cluster process; KV blocks in use and queue of every engine."""
    row: dict[str, Any] = {"t": time.time(), "procs": {}, "kv": {}}
    for name, pid in cluster.pids().items():
        s = proc_sample(pid)
        if s is not None:
            row["procs"][name] = {"pid": pid, **s}
    for r in cluster.replicas():
        if r.get("url") and r["phase"] in ("ready", "draining"):
            try:
                load = httpx.get(r["url"] + "/load", timeout=5).json()
                row["kv"][r["id"]] = {"used_blocks": load["total_kv_blocks"]
                                      - load["free_kv_blocks"],
                                      "total_blocks": load["total_kv_blocks"],
                                      "running": load["running"], "waiting": load["waiting"]}
            except (httpx.HTTPError, ValueError, KeyError):
                pass
    return row


async def sampler(cluster: Cluster, every_s: float, out: list[dict[str, Any]],
                  stop: asyncio.Event, t0: float) -> None:
    while not stop.is_set():
        row = await asyncio.to_thread(snapshot, cluster)
        row["t_s"] = time.perf_counter() - t0
        out.append(row)
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


def compare(baseline: dict[str, Any], end: dict[str, Any], idle: dict[str, Any]
            ) -> list[list[Any]]:
    """Rows: process, RSS MiB and fds at baseline / end / after idle; KV blocks used."""
    rows = []
    for name in baseline["procs"]:
        b, e, i = (s["procs"].get(name) for s in (baseline, end, idle))
        kv = [s["kv"].get(name, {}).get("used_blocks") for s in (baseline, end, idle)]
        rows.append([name,
                     *(f"{x['rss'] / 2**20:.0f}" if x else "gone" for x in (b, e, i)),
                     *(x["fds"] if x else "gone" for x in (b, e, i)),
                     "/".join("-" if k is None else str(k) for k in kv)])
    return rows


async def main_async(args: argparse.Namespace) -> None:
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="strata-soak-"))
    print(f"CPU: {info['cpu']} ({info['cores']} cores), load average {info['loadavg']}, "
          f"commit {info['commit']}; logs in {workdir}")
    cluster = Cluster(cluster_config(workdir), workdir, "soak")
    cluster.start({"engine": 2})
    samples: list[dict[str, Any]] = []
    try:
        url = cluster.url
        cap = args.capacity
        if cap is None:
            probe = specs_for(args, (0, 600), 1.0, args.seed + 1)
            cap = await capacity(url, probe, args.clients, args.capacity_s)
        rate = args.load * cap
        print(f"capacity {cap:.2f} req/s; replaying at {rate:.2f} req/s "
              f"({args.load:g} x) for {args.duration_s:g} s")
        warm = specs_for(args, (1800, 1830), 1.0, args.seed + 2)[:20]
        await run_load(warm, ClientOptions(target=url, model=MODEL), concurrency=4)
        await asyncio.sleep(args.idle_s)
        baseline = await asyncio.to_thread(snapshot, cluster)
        specs = specs_for(args, (0, args.duration_s), rate / TRACE_RATE, args.seed)
        stop = asyncio.Event()
        t0 = time.perf_counter()
        watch = asyncio.create_task(sampler(cluster, args.sample_s, samples, stop, t0))
        out = await run_load(specs, ClientOptions(target=url, model=MODEL, timeout_s=300))
        end = await asyncio.to_thread(snapshot, cluster)
        await asyncio.sleep(args.idle_s)
        idle = await asyncio.to_thread(snapshot, cluster)
        stop.set()
        await watch
    finally:
        cluster.stop()
    records = out.records
    statuses: dict[str, int] = {}
    for r in records:
        key = r.status if r.http_status in (None, 200) else f"{r.status} {r.http_status}"
        statuses[key] = statuses.get(key, 0) + 1
    ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
    rows = compare(baseline, end, idle)
    md = table(["process", "RSS MiB base", "end", "after idle", "fds base", "end",
                "after idle", "KV blocks used base/end/idle"], rows)
    head = table(["requests", "statuses", "offered req/s", "capacity req/s",
                  "TTFT p50 / p99 ms", "span s"],
                 [[len(records), ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
                   f"{len(specs) / args.duration_s:.2f}", f"{cap:.2f}",
                   f"{(percentile(ttfts, 50) or 0) * 1000:.0f} / "
                   f"{(percentile(ttfts, 99) or 0) * 1000:.0f}",
                   f"{samples[-1]['t_s']:.0f}" if samples else "-"]])
    md = head + "\n\n" + md
    print(md)
    result = {"machine": info, "loadavg_end": machine()["loadavg"], "args": vars(args),
              "capacity_rps": cap, "rate_rps": rate, "requests": len(records),
              "statuses": statuses, "baseline": baseline, "end": end, "after_idle": idle,
              "samples": samples, "table": md,
              "errors_seen": sorted({r.error for r in records if r.error})[:8]}
    print(f"wrote {write_result(args.name, result)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=1800.0)
    p.add_argument("--trace", default="azure-conv")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder of the traces (default: shared/data beside the repo)")
    p.add_argument("--length-factor", type=float, default=0.1)
    p.add_argument("--load", type=float, default=0.6, help="fraction of the capacity")
    p.add_argument("--capacity", type=float, default=None, help="req/s; skips measuring")
    p.add_argument("--capacity-s", type=float, default=45.0)
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients for capacity")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--idle-s", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="soak", help="result file name")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
