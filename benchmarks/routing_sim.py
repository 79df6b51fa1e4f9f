"""Routing policies on workloads with and without prompt sharing, in the simulator.

    python benchmarks/routing_sim.py                 # 3 workloads x rates x policies x 3 seeds
    python benchmarks/routing_sim.py --workloads chat --rates chat=44 --seeds 1

Four A100-80GB replicas of Llama-3-8B (``strata simulate``'s roofline model, the real
scheduler, block manager with prefix caching, and the real routing policies), static, no
autoscaler. Workloads (``strata.sim.workloads``): ``chat`` (a few long system prompts shared
by many users, multi-turn sessions whose history grows), ``unique`` (the same arrivals and
lengths with nothing shared), ``hot`` (one 2k-token prefix in 80 % of the requests), and
``mooncake`` (the Mooncake conversation hour, prompt lengths x0.5 so they fit 8k, time x0.25:
the regime of the issue's first look). Each (workload, rate, policy) runs with several
seeds (the trace's seed); the table shows the median and the min-max spread.

Policies: ``round_robin``, ``least_requests``, ``prefix_affinity``, ``resource_match`` with
``cache_weight`` 0 (the policy before the cache term, named ``resource_match_w0``) and the
default ``resource_match``. Writes ``results/routing_sim.json`` and a plot of p90 TTFT
against the offered rate (``--plot``, default ``docs/routing_sim.png``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from strata.bench.traces import Trace, fit_lengths, head, load_trace, scale_time
from strata.config import parse_cluster_config
from strata.sim.replica_cost import build_replica_model
from strata.sim.report import summarize
from strata.sim.scenario import SimOptions, build_setup, simulate
from strata.sim.workloads import WorkloadOptions, build

POLICIES = ["round_robin", "least_requests", "prefix_affinity", "resource_match_w0",
            "resource_match"]
# Offered rates (req/s) per workload, around the load where round robin saturates.
RATES = {"chat": [40.0, 48.0, 52.0], "unique": [26.0, 34.0], "hot": [48.0, 56.0],
         "mooncake": [0.25]}
ENGINE = {"block_size": 16, "max_num_seqs": 128, "max_num_batched_tokens": 2048}
SLO_TTFT_S = 2.0


def policy_config(name: str) -> dict[str, Any]:
    """The cluster file's routing block for a policy label."""
    if name == "resource_match_w0":
        return {"policy": "resource_match", "params": {"cache_weight": 0.0}}
    return {"policy": name}


def workload(name: str, rate: float, seed: int, duration_s: float,
             data_dir: Path | None) -> Trace:
    """A synthetic workload at ``rate`` req/s, or the Mooncake hour at time scale ``rate``."""
    if name == "mooncake":
        base = fit_lengths(load_trace("mooncake", data_dir), 0.5, 8192)
        return head(scale_time(base, rate), 3000)
    return build(name, WorkloadOptions(rate=rate, duration_s=duration_s, seed=seed))


def run_one(args: tuple[str, float, str, int, float, int, Path | None]) -> dict[str, Any]:
    """One simulation: its summary figures."""
    wl, rate, policy, seed, duration_s, replicas, data_dir = args
    trace = workload(wl, rate, seed, duration_s, data_dir)
    cfg = parse_cluster_config({"engine": ENGINE, "tiers": {"engine": {"replicas": replicas}},
                                "routing": policy_config(policy),
                                "slos": {"ttft_s": SLO_TTFT_S, "tpot_s": 0.1}})
    setup = build_setup(cfg, build_replica_model("a100-80g", "llama-3-8b"), trace,
                        SimOptions(initial_units=replicas, tail_s=600.0))
    t0 = time.perf_counter()
    sim, stats = simulate(setup, trace)
    s = summarize(sim, stats)
    prompt = sum(r.input_tokens for r in trace.records)
    return {"workload": wl, "rate": rate, "policy": policy, "seed": seed,
            "requests": len(trace.records), "ttft_p50_s": s["ttft"]["p50_ms"] / 1000,
            "ttft_p90_s": s["ttft"]["p90_ms"] / 1000, "e2e_mean_s": s["e2e"]["mean_ms"] / 1000,
            "tpot_p50_ms": s["tpot"]["p50_ms"], "throughput_rps": s["request_throughput"],
            "goodput_rps": s["goodput"], "cached_share": s["prefix_cached_tokens"] / prompt,
            "wall_s": time.perf_counter() - t0}


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median, min, max."""
    return statistics.median(values), min(values), max(values)


def table(rows: list[dict[str, Any]], duration_s: float) -> str:
    """Markdown: one row per (workload, rate, policy), median [min-max] over seeds; offered
    is the nominal rate and the requests that arrived per second (sessions are cut at the
    end of the arrivals, so a chat trace delivers less than its nominal rate)."""
    out = ["| workload | offered (arrived/s) | policy | TTFT p90 s | vs round_robin | TTFT p50 s | "
           "E2E mean s | req/s | prefix-cached share |",
           "|---|--:|---|--:|--:|--:|--:|--:|--:|"]
    keys = sorted({(r["workload"], r["rate"]) for r in rows},
                  key=lambda k: (list(RATES).index(k[0]) if k[0] in RATES else 9, k[1]))
    for wl, rate in keys:
        sel = [r for r in rows if r["workload"] == wl and r["rate"] == rate]
        base = statistics.median(r["ttft_p90_s"] for r in sel if r["policy"] == "round_robin") \
            if any(r["policy"] == "round_robin" for r in sel) else None
        for pol in POLICIES:
            got = [r for r in sel if r["policy"] == pol]
            if not got:
                continue
            m, lo, hi = spread([r["ttft_p90_s"] for r in got])
            ratio = f"{m / base:.2f}x" if base else ""
            arrived = statistics.median(r["requests"] for r in got) / duration_s
            offered = (f"time x{rate:g}, 3000 requests" if wl == "mooncake"
                       else f"{rate:g} ({arrived:.1f})")
            out.append(
                f"| {wl} | {offered} | {pol} | {m:.2f} [{lo:.2f}-{hi:.2f}] | {ratio} | "
                f"{statistics.median(r['ttft_p50_s'] for r in got):.2f} | "
                f"{statistics.median(r['e2e_mean_s'] for r in got):.1f} | "
                f"{statistics.median(r['throughput_rps'] for r in got):.1f} | "
                f"{statistics.median(r['cached_share'] for r in got):.1%} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """p90 TTFT against the offered rate, one panel per synthetic workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = [w for w in RATES if w != "mooncake" and any(r["workload"] == w for r in rows)]
    if not wls:
        return
    fig, axes = plt.subplots(1, len(wls), figsize=(4.5 * len(wls), 4), squeeze=False)
    for ax, wl in zip(axes[0], wls, strict=True):
        for pol in POLICIES:
            rates = sorted({r["rate"] for r in rows if r["workload"] == wl and r["policy"] == pol})
            if not rates:
                continue
            med, err_lo, err_hi = [], [], []
            for rate in rates:
                m, lo, hi = spread([r["ttft_p90_s"] for r in rows if r["workload"] == wl
                                    and r["policy"] == pol and r["rate"] == rate])
                med.append(m)
                err_lo.append(m - lo)
                err_hi.append(hi - m)
            ax.errorbar(rates, med, yerr=[err_lo, err_hi], label=pol, marker="o", capsize=3)
        ax.set_yscale("log")
        ax.set_xlabel("offered req/s")
        ax.set_ylabel("TTFT p90 (s, log)")
        ax.set_title(wl)
        ax.axhline(SLO_TTFT_S, color="grey", ls=":")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("4x A100-80GB, Llama-3-8B (simulated); median over seeds, bars min-max")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run the grid, print the table, write the JSON and the plot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workloads", default="chat,unique,hot,mooncake")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--rates", default="", help="e.g. chat=40,48;hot=44 (default: RATES)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--output", type=Path, default=Path("results/routing_sim.json"))
    p.add_argument("--plot", type=Path, default=Path("docs/routing_sim.png"))
    args = p.parse_args(argv)
    rates = {k: list(v) for k, v in RATES.items()}
    for part in filter(None, args.rates.split(";")):
        wl, vals = part.split("=")
        rates[wl] = [float(x) for x in vals.split(",")]
    grid = []
    for wl in args.workloads.split(","):
        seeds = [0] if wl == "mooncake" else range(args.seeds)  # one fixed trace
        for rate in rates[wl]:
            for pol in args.policies.split(","):
                for seed in seeds:
                    grid.append((wl, rate, pol, seed, args.duration, args.replicas,
                                 args.data_dir))
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(run_one, grid))
    else:
        rows = [run_one(g) for g in grid]
    md = table(rows, args.duration)
    print(md)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/routing_sim.py", *(argv or sys.argv[1:])]),
        "hardware": "a100-80g", "model": "llama-3-8b", "replicas": args.replicas,
        "engine": ENGINE, "duration_s": args.duration, "rows": rows,
        "wall_s": time.perf_counter() - t0}, indent=1))
    args.output.with_suffix(".md").write_text(md + "\n")
    plot(rows, args.plot)
    print(f"results: {args.output}, plot: {args.plot}")


if __name__ == "__main__":
    main()
