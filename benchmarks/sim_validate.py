"""Validate the simulator against a real local run: same trace window, same engine options.

    python benchmarks/sim_validate.py                    # profile, measure, profile, compare
    python benchmarks/sim_validate.py --reuse-measured   # compare again with the saved files

This machine is shared, and its speed drifts by 2-3x within minutes as other work comes and
goes, so the run is bracketed: ``strata simulate profile`` measures the engine just before
and just after the real run, and the simulation uses the mean of the two fits (it also
reports each alone). The real run: one ``strata engine`` process (bundled SmolLM2-135M,
the profiled thread count and dtype) replaying a short window of a trace at a low rate with
``strata bench``'s runner. The simulation: the same requests, one replica, the same engine
options, ``--hardware cpu-local``. Prints TTFT/E2E p50 and p90 and throughput side by side
with the error, and the machine's load average during each phase; writes
``results/sim_validate.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from strata.bench.client import ClientOptions
from strata.bench.prompts import load_bench_tokenizer
from strata.bench.results import BenchResult, load_result, save_result
from strata.bench.runner import RunOptions, run_benchmark
from strata.bench.traces import Trace
from strata.bench.workload import WorkloadOptions, build_trace, parse_window
from strata.config import parse_cluster_config
from strata.sim.cpu_profile import (
    CpuProfile,
    ProfileOptions,
    free_port,
    run_profile,
    start_engine,
    stop_engine,
)
from strata.sim.replica_cost import build_replica_model
from strata.sim.report import summarize
from strata.sim.scenario import build_setup, simulate

ROWS = (("TTFT p50 ms", "ttft", "p50_ms"), ("TTFT p90 ms", "ttft", "p90_ms"),
        ("E2E p50 ms", "e2e", "p50_ms"), ("E2E p90 ms", "e2e", "p90_ms"),
        ("TPOT p50 ms", "tpot", "p50_ms"))


def measure(workload: WorkloadOptions, engine: ProfileOptions, console: Console) -> BenchResult:
    """Run the window against a real engine process (started and stopped here)."""
    port = free_port()
    console.print(f"starting strata engine on port {port} ...")
    proc, startup = start_engine(port, engine)
    console.print(f"engine ready after {startup:.1f} s; replaying "
                  f"{len(build_trace(workload).records)} requests ...")
    try:
        client = ClientOptions(target=f"http://127.0.0.1:{port}", model="auto")
        result = run_benchmark(workload, client, RunOptions(), load_bench_tokenizer(None))
    finally:
        stop_engine(proc)
    if result.summary.failed:
        raise RuntimeError(f"{result.summary.failed} request(s) failed: {result.summary.errors}")
    return result


def mean_profile(a: CpuProfile, b: CpuProfile) -> CpuProfile:
    """The average of two fits (the model is linear in its coefficients)."""
    coef = {k: (a.coefficients[k] + b.coefficients[k]) / 2 for k in a.coefficients}
    return replace(a, coefficients=coef,
                   request_overhead_s=(a.request_overhead_s + b.request_overhead_s) / 2,
                   startup_s=(a.startup_s + b.startup_s) / 2, r2=min(a.r2, b.r2),
                   measured_at=f"mean of {a.measured_at} and {b.measured_at}", raw=())


def simulate_with(profile: CpuProfile, path: Path, trace: Trace, engine: ProfileOptions
                  ) -> dict[str, Any]:
    """Simulate the trace on one cpu-local replica described by ``profile``."""
    path.write_text(profile.to_json())
    cfg = parse_cluster_config({"engine": {
        "block_size": engine.block_size, "max_num_seqs": engine.max_num_seqs,
        "max_num_batched_tokens": engine.max_num_batched_tokens,
        "kv_cache": engine.kv_cache_bytes}, "tiers": {"engine": {"replicas": 1}}})
    replica = build_replica_model("cpu-local", "smollm2-135m", profile_path=path)
    cluster, stats = simulate(build_setup(cfg, replica, trace), trace)
    return summarize(cluster, stats)


def source_commit() -> dict[str, Any]:
    """The commit of the checkout that ran (engine and simulator), and whether strata/ differs."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True,
                              check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "strata_modified": bool(git("status", "--porcelain", "--", "strata"))}


def compare(measured: BenchResult, sim: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (metric, measured, simulated, error)."""
    m = measured.summary.model_dump()
    rows = []
    for label, group, key in ROWS:
        a, b = m[group][key], sim[group][key]
        rows.append({"metric": label, "measured": a, "simulated": b,
                     "error": (b - a) / a if a else None})
    for label, key in (("throughput req/s", "request_throughput"),
                       ("output tokens/s", "output_token_throughput")):
        a, b = m[key], sim[key]
        rows.append({"metric": label, "measured": a, "simulated": b,
                     "error": (b - a) / a if a else None})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Profile, measure, profile (or reuse the files), simulate, compare, print and save."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trace", default="azure-code")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--window", default="0:600", help="START:END seconds of the trace")
    p.add_argument("--rate-scale", type=float, default=0.025)
    p.add_argument("--length-factor", type=float, default=0.125)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--out-dir", type=Path, default=Path("results/sim_validate"))
    p.add_argument("--reuse-measured", action="store_true")
    args = p.parse_args(argv)
    console = Console()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    workload = WorkloadOptions(trace=args.trace, data_dir=args.data_dir,
                               window=parse_window(args.window), rate_scale=args.rate_scale,
                               length_factor=args.length_factor, max_context=args.max_context,
                               seed=args.seed)
    engine = ProfileOptions(threads=args.threads, dtype=args.dtype,
                            max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens)
    load: dict[str, tuple[float, ...]] = {}
    source = source_commit()
    if args.reuse_measured:
        before = CpuProfile.load(out / "profile_before.json")
        after = CpuProfile.load(out / "profile_after.json")
        measured = load_result(out / "measured.json")
        load = json.loads((out / "load.json").read_text()) if (out / "load.json").exists() \
            else {}
    else:
        console.print("[bold]1/3[/bold] profile before the run")
        before = run_profile(engine, log=console.print)
        load["profile_before"] = os.getloadavg()
        (out / "profile_before.json").write_text(before.to_json())
        console.print("[bold]2/3[/bold] the measured run")
        measured = measure(workload, engine, console)
        load["run"] = os.getloadavg()
        save_result(measured, out / "measured.json")
        console.print("[bold]3/3[/bold] profile after the run")
        after = run_profile(engine, log=console.print)
        load["profile_after"] = os.getloadavg()
        (out / "profile_after.json").write_text(after.to_json())
        (out / "load.json").write_text(json.dumps(load))
        (out / "source.json").write_text(json.dumps(source))
    if (out / "source.json").exists():
        source = json.loads((out / "source.json").read_text())
    trace = build_trace(workload)
    sims = {name: simulate_with(prof, out / f"profile_{name}.json", trace, engine)
            for name, prof in (("mean", mean_profile(before, after)), ("before", before),
                               ("after", after))}
    comparisons = {name: compare(measured, sim) for name, sim in sims.items()}
    table = Table(title=f"simulated vs measured: {trace.name} window {args.window}, rate "
                        f"x{args.rate_scale:g}, lengths x{args.length_factor:g}, "
                        f"{len(trace.records)} requests, 1 engine ({engine.threads} thread, "
                        f"{engine.dtype})")
    for col in ("metric", "measured", "simulated (mean fit)", "error", "error (before fit)",
                "error (after fit)"):
        table.add_column(col, justify="left" if col == "metric" else "right")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:+.1%}"

    for i, r in enumerate(comparisons["mean"]):
        table.add_row(r["metric"], f"{r['measured']:,.2f}", f"{r['simulated']:,.2f}",
                      pct(r["error"]), pct(comparisons["before"][i]["error"]),
                      pct(comparisons["after"][i]["error"]))
    console.print(table)
    if load:
        console.print("load average (1, 5, 15 min) after each phase: "
                      + "; ".join(f"{k} {tuple(round(x, 1) for x in v)}" for k, v in load.items()))
    console.print(f"engine and simulator from commit {source['commit'][:12]}"
                  + (" (strata/ modified)" if source["strata_modified"] else ""))
    doc = {"source": source, "workload": {"trace": args.trace, "window": args.window,
                        "rate_scale": args.rate_scale, "length_factor": args.length_factor,
                        "max_context": args.max_context, "seed": args.seed,
                        "requests": len(trace.records)},
           "engine": vars(engine), "load_average": load, "comparison": comparisons,
           "measured_summary": measured.summary.model_dump(), "simulated_summary": sims}
    path = Path("results/sim_validate.json")
    path.write_text(json.dumps(doc, indent=1))
    console.print(f"results: {path} (profiles and the measured run in {out})")


if __name__ == "__main__":
    main()
