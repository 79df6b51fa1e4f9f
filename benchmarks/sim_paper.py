"""The paper's GPU-scale experiment in the simulator, and the simulator's own speed test.

    python benchmarks/sim_paper.py                      # 24 h day, LLaMA-2-13B on A100-80GB
    python benchmarks/sim_paper.py --hours 3 --jobs 2   # a shorter day, two processes
    python benchmarks/sim_paper.py speed                # 1 h of azure-conv x10 on 64 replicas

``paper`` builds the day-shaped load from the Azure conversation trace
(``strata.sim.experiments.day_trace``), calibrates one unit's capacity, simulates the five
configurations (static for the mean, static for the peak, HPA on GPU utilisation,
resource_match + predictive, the same with two-stage pipelines), computes the oracle, prints
the table beside the paper's claims and writes ``results/sim_paper.json`` and PNG plots.
``speed`` times one simulation and reports events/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from strata.bench.traces import load_trace, scale_rate, window
from strata.config import parse_cluster_config
from strata.sim.experiments import DayOptions, PaperOptions, run_paper
from strata.sim.replica_cost import build_replica_model
from strata.sim.report import summarize
from strata.sim.scenario import SimOptions, build_setup, simulate
from strata.sim.types import SimRequest

PAPER = {"e2e_latency": -0.372, "throughput": 2.1, "utilization": 0.58}
ORDER = ("static-mean", "static-peak", "hpa-gpu-util", "strata-llm", "strata-predictive",
         "strata-stages")


def paper_table(doc: dict[str, Any]) -> Table:
    """One row per configuration plus the oracle."""
    t = Table(title=f"Day of {doc['trace']['requests']:,} requests, "
                    f"{doc['options']['model']} on {doc['options']['hardware']} "
                    f"(SLO TTFT <= {doc['options']['slo_ttft_s']} s, "
                    f"TPOT <= {doc['options']['slo_tpot_s'] * 1000:.0f} ms)")
    for col in ("configuration", "E2E mean s", "E2E p90 s", "TTFT p90 s", "req/s",
                "out tok/s per GPU", "utilisation", "GPU-hours", "SLO attainment"):
        t.add_column(col, justify="right" if col != "configuration" else "left")
    for name in ORDER:
        if name not in doc["results"]:
            continue
        s = doc["results"][name]["summary"]
        g = s["gpu"]
        t.add_row(name, f"{s['e2e']['mean_ms'] / 1000:.2f}", f"{s['e2e']['p90_ms'] / 1000:.2f}",
                  f"{s['ttft']['p90_ms'] / 1000:.2f}", f"{s['request_throughput']:.2f}",
                  f"{g['output_tokens_per_gpu_s']:.1f}", f"{g['utilization']:.1%}",
                  f"{g['provisioned_gpu_hours']:.1f}", f"{s['slo_attainment']:.1%}")
    o = doc["oracle"]
    t.add_row("oracle schedule (knows the future)", "", "", "", "", "", "",
              f"{o['gpu_hours']:.1f}", "")
    t.add_row("fluid at best SLO capacity", "", "", "", "", "", "",
              f"{o['fluid_gpu_hours']:.1f}", "")
    return t


def claims_table(doc: dict[str, Any]) -> Table:
    """strata vs each baseline, beside the paper's -37.2 % latency, 2.1x throughput, +58 %."""
    t = Table(title="strata (resource_match + llm/predictive autoscaling) vs the baselines, "
                    "beside the paper's claims")
    for col in ("baseline", "E2E mean change", "out tok/s per GPU ratio", "utilisation change",
                "GPU-hours ratio"):
        t.add_column(col, justify="right" if col != "baseline" else "left")
    res = doc["results"]
    for ours in ORDER[3:]:
        if ours not in res:
            continue
        a = res[ours]["summary"]
        for base in ORDER[:3]:
            if base not in res:
                continue
            b = res[base]["summary"]
            t.add_row(f"{ours} vs {base}",
                      f"{a['e2e']['mean_ms'] / b['e2e']['mean_ms'] - 1:+.1%}",
                      f"{a['gpu']['output_tokens_per_gpu_s'] / b['gpu']['output_tokens_per_gpu_s']:.2f}x",
                      f"{a['gpu']['utilization'] / b['gpu']['utilization'] - 1:+.1%}",
                      f"{a['gpu']['provisioned_gpu_hours'] / b['gpu']['provisioned_gpu_hours']:.2f}x")
    t.add_row("paper's claim", f"{PAPER['e2e_latency']:+.1%}", f"{PAPER['throughput']:.1f}x",
              f"+{PAPER['utilization']:.0%}", "")
    return t


def markdown(doc: dict[str, Any]) -> str:
    """The two tables as Markdown, for docs/results.md."""
    o = doc["options"]
    lines = ["| configuration | E2E mean s | E2E p90 s | TTFT p90 s | req/s | out tok/s per GPU "
             "| utilisation | GPU-hours | SLO attainment |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ORDER:
        if name not in doc["results"]:
            continue
        s = doc["results"][name]["summary"]
        g = s["gpu"]
        lines.append(f"| {name} | {s['e2e']['mean_ms'] / 1000:.2f} | {s['e2e']['p90_ms'] / 1000:.2f} "
                     f"| {s['ttft']['p90_ms'] / 1000:.2f} | {s['request_throughput']:.2f} "
                     f"| {g['output_tokens_per_gpu_s']:.1f} | {g['utilization']:.1%} "
                     f"| {g['provisioned_gpu_hours']:.1f} | {s['slo_attainment']:.1%} |")
    orc = doc["oracle"]
    lines.append(f"| oracle schedule (knows the future) | | | | | | | {orc['gpu_hours']:.1f} | |")
    lines.append(f"| fluid at best SLO capacity | | | | | | | {orc['fluid_gpu_hours']:.1f} | |")
    lines += ["", f"SLO: TTFT <= {o['slo_ttft_s']} s and TPOT <= {o['slo_tpot_s'] * 1000:.0f} ms "
              "per request.", "",
              "| comparison | E2E mean | out tok/s per GPU | utilisation | GPU-hours |",
              "|---|---:|---:|---:|---:|"]
    res = doc["results"]
    for ours in ORDER[3:]:
        for base in ORDER[:3]:
            if ours not in res or base not in res:
                continue
            a, b = res[ours]["summary"], res[base]["summary"]
            lines.append(
                f"| {ours} vs {base} | {a['e2e']['mean_ms'] / b['e2e']['mean_ms'] - 1:+.1%} "
                f"| {a['gpu']['output_tokens_per_gpu_s'] / b['gpu']['output_tokens_per_gpu_s']:.2f}x "
                f"| {a['gpu']['utilization'] / b['gpu']['utilization'] - 1:+.1%} "
                f"| {a['gpu']['provisioned_gpu_hours'] / b['gpu']['provisioned_gpu_hours']:.2f}x |")
    lines.append(f"| paper's claim | {PAPER['e2e_latency']:+.1%} | {PAPER['throughput']:.1f}x "
                 f"| +{PAPER['utilization']:.0%} | |")
    return "\n".join(lines)


def plot(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Timeline of GPUs per configuration and arrival rate; E2E and GPU-hours bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name in ORDER:
        if name in doc["results"]:
            ser = doc["results"][name]["series"]
            ax.plot([p["t_s"] / 3600 for p in ser], [p["gpus"] for p in ser], label=name,
                    lw=1.2)
    ax.set_xlabel("hour of the day")
    ax.set_ylabel("GPUs provisioned")
    ax2 = ax.twinx()
    r = doc["trace"]["rates_600s"]
    ax2.plot([i * 600 / 3600 for i in range(len(r))], r, color="grey", ls=":", label="arrivals")
    ax2.set_ylabel("arrivals req/s (10-min mean)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("GPUs provisioned over the simulated day")
    fig.tight_layout()
    p = out_dir / "sim_paper_gpus.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    names = [n for n in ORDER if n in doc["results"]]
    sums = [doc["results"][n]["summary"] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].bar(names, [s["e2e"]["mean_ms"] / 1000 for s in sums])
    axes[0].set_yscale("log")  # a static deployment sized for the mean queues for hours
    axes[0].set_title("E2E mean (s, log scale)")
    axes[1].bar(names, [s["gpu"]["provisioned_gpu_hours"] for s in sums])
    axes[1].axhline(doc["oracle"]["gpu_hours"], color="k", ls="--", label="oracle schedule")
    axes[1].axhline(doc["oracle"]["fluid_gpu_hours"], color="grey", ls=":",
                    label="fluid at SLO capacity")
    axes[1].legend()
    axes[1].set_title("GPU-hours")
    axes[2].bar(names, [s["slo_attainment"] * 100 for s in sums])
    axes[2].set_title("SLO attainment (%)")
    for a in axes:
        a.tick_params(axis="x", rotation=35, labelsize=8)
    fig.tight_layout()
    p = out_dir / "sim_paper_bars.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths


def outcome_hash(requests: list[SimRequest]) -> str:
    """SHA-256 over every request's outcome: equal before and after a change that claims to
    change nothing in the simulation."""
    h = hashlib.sha256()
    for r in requests:
        h.update(repr((r.req_id, r.arrival_s, r.dispatched_s, r.first_token_s, r.finish_s,
                       r.replica, r.status, r.preemptions, r.cached_tokens)).encode())
    return h.hexdigest()


def speed(args: argparse.Namespace, console: Console) -> None:
    """One hour of the trace at 10x on 64 replicas: wall time and events/s."""
    base = load_trace("azure-conv", args.data_dir)
    if args.speed_seconds < base.duration_s:
        base = window(base, 0.0, args.speed_seconds)
    tr = scale_rate(base, args.rate_scale, args.seed)
    cfg = parse_cluster_config({
        "engine": {"block_size": args.block_size, "max_num_seqs": 128,
                   "max_num_batched_tokens": 2048},
        "tiers": {"engine": {"replicas": args.replicas}}, "routing": {"policy": args.routing}})
    replica = build_replica_model(args.hardware, args.model)
    setup = build_setup(cfg, replica, tr, SimOptions())
    t0 = time.perf_counter()
    if args.cprofile:
        import cProfile

        prof = cProfile.Profile()
        cluster, stats = prof.runcall(simulate, setup, tr)
        breakdown = cost_breakdown(prof)
    else:
        cluster, stats = simulate(setup, tr)
        breakdown = {}
    wall = time.perf_counter() - t0
    s = summarize(cluster, stats)
    sim = s["simulator"]
    outcomes = outcome_hash(cluster.requests)
    doc = {"requests": len(tr.records), "outcome_sha256": outcomes,
           "replicas": args.replicas, "routing": args.routing,
           "rate_scale": args.rate_scale, "block_size": args.block_size, "wall_s": wall,
           "cprofile": args.cprofile, "breakdown": breakdown, "simulator": sim, "summary": s}
    out = Path(args.output or "results/sim_speed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    t = Table(title=f"simulator speed: azure-conv {min(args.speed_seconds, 3600) / 60:g} min "
                    f"x{args.rate_scale:g}, {args.replicas} replicas, {args.routing}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in (("requests", f"{len(tr.records):,}"), ("wall s", f"{wall:.1f}"),
                 ("events", f"{sim['events']:,}"), ("events/s", f"{sim['events_per_s']:,.0f}"),
                 ("iterations (simulated)", f"{sim['iterations']:,}"),
                 ("scheduler.step() calls", f"{sim['scheduler_steps']:,}"),
                 ("iterations/s", f"{sim['iterations_per_s']:,.0f}"),
                 ("virtual s", f"{sim['virtual_s']:,.0f}"),
                 ("per-request outcome sha256", outcomes[:16])):
        t.add_row(k, v)
    console.print(t)
    if breakdown:
        b = Table(title="where the time goes (cProfile self time; the profiler inflates it)")
        b.add_column("component")
        b.add_column("share", justify="right")
        for k, v in breakdown.items():
            b.add_row(k, f"{v:.1%}")
        console.print(b)
    console.print(f"results: {out}")


COMPONENTS = (("strata/routing/", "routing policy (strata.routing)"),
              ("strata/engine/scheduler.py", "scheduler (strata.engine.scheduler)"),
              ("strata/engine/kv_cache.py", "block manager (strata.engine.kv_cache)"),
              ("strata/engine/sequence.py", "sequence properties (strata.engine.sequence)"),
              ("strata/sim/replica.py", "simulated replica"),
              ("strata/sim/decode_run.py", "simulated replica"),
              ("strata/sim/gateway.py", "simulated gateway"),
              ("strata/sim/cluster.py", "simulated cluster and autoscaler"),
              ("strata/sim/perf_model.py", "performance model"),
              ("strata/sim/events.py", "event loop"),
              ("strata/autoscale/", "autoscaling policy"),
              ("strata/load.py", "load report"),
              ("strata/gateway/", "gateway helpers (prefix index, demand)"),
              ("<string>", "dataclass __init__ (LoadReport, ReplicaState, ...)"),
              ("dataclasses.py", "dataclass __init__ (LoadReport, ReplicaState, ...)"))


def cost_breakdown(prof: Any) -> dict[str, float]:
    """Self time per component, as a share of the total."""
    import pstats

    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    shares: dict[str, float] = {}
    total = 0.0
    for (filename, _, _), (_, _, tottime, _, _) in stats.items():
        total += tottime
        name = next((label for key, label in COMPONENTS if key in filename),
                    "builtins (len, sum, list and deque methods, ...)"
                    if filename == "~" else "other")
        shares[name] = shares.get(name, 0.0) + tottime
    return dict(sorted(((k, v / total) for k, v in shares.items()), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the experiment or the speed test."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", nargs="?", default="paper", choices=("paper", "speed"))
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--hardware", default="a100-80g")
    p.add_argument("--model", default="llama-2-13b")
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--day-rate-scale", type=float, default=1.0,
                   help="the day's mean rate as a multiple of the trace's")
    p.add_argument("--peak-to-trough", type=float, default=4.0)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--slo-ttft-s", type=float, default=2.0)
    p.add_argument("--slo-tpot-s", type=float, default=0.1)
    p.add_argument("--only", default="", help="comma-separated configuration names")
    p.add_argument("--jobs", type=int, default=1, help="configurations simulated in parallel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    p.add_argument("--plots", type=Path, default=Path("results"))
    # speed
    p.add_argument("--replicas", type=int, default=64)
    p.add_argument("--rate-scale", type=float, default=10.0)
    p.add_argument("--routing", default="resource_match")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--cprofile", action="store_true", help="speed: break the time down")
    p.add_argument("--speed-seconds", type=float, default=3600.0,
                   help="speed: the first N seconds of the trace")
    args = p.parse_args(argv)
    console = Console()
    if args.mode == "speed":
        speed(args, console)
        return
    opts = PaperOptions(hardware=args.hardware, model=args.model,
                        day=DayOptions(hours=args.hours, rate_scale=args.day_rate_scale,
                                       peak_to_trough=args.peak_to_trough, seed=args.seed),
                        slo_ttft_s=args.slo_ttft_s, slo_tpot_s=args.slo_tpot_s,
                        stages=args.stages)
    base = load_trace("azure-conv", args.data_dir)
    t0 = time.perf_counter()
    only = tuple(x for x in args.only.split(",") if x)
    doc = run_paper(opts, base, jobs=args.jobs, only=only)
    doc["wall_s"] = time.perf_counter() - t0
    doc["command"] = " ".join(["python", "benchmarks/sim_paper.py", *(argv or sys.argv[1:])])
    out = Path(args.output or "results/sim_paper.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    cal = doc["calibration"]
    console.print(f"capacity: {cal['whole_model']['capacity_rps']:.2f} req/s per replica, "
                  f"{cal['stages']['capacity_rps']:.2f} req/s per {opts.stages}-stage pipeline; "
                  f"day: {doc['trace']['mean_rps']:.2f} req/s mean, "
                  f"{doc['trace']['peak_10min_rps']:.2f} peak (10 min)")
    console.print(paper_table(doc))
    console.print(claims_table(doc))
    md = out.with_suffix(".md")
    md.write_text(markdown(doc) + "\n")
    console.print(f"markdown tables: {md}")
    for path in plot(doc, args.plots):
        console.print(f"plot: {path}")
    console.print(f"results: {out} ({doc['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
