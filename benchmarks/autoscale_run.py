"""Evidence for the elastic cluster: ``strata serve`` under a bursty window of a real trace.

For each autoscaling policy the script starts a cluster from a generated cluster file
(bundled SmolLM2-135M, 1 to ``--max-replicas`` engine replicas of one torch thread each),
replays the same trace window through ``strata.bench`` (open loop, real prompts of the
trace's lengths), scrapes the gateway's /metrics every second (ready, desired and existing
replicas on the requests' clock), stops the cluster with SIGINT, and writes:

* ``<out>/autoscale_<policy>.json``: the workload, every request, the replica time series,
  every scaling decision and a summary (replica-seconds, TTFT percentiles, SLO attainment);
* ``<out>/autoscale_run.png``: request rate, replicas and TTFT over time, one column per
  policy; a table on stdout and ``<out>/autoscale_run.md``.

Replica-seconds integrate the replicas that exist (starting, ready, draining): a starting
replica holds its core as much as a serving one. Usage (about 10 minutes per policy)::

    python benchmarks/autoscale_run.py --policies hpa,llm,predictive
    python benchmarks/autoscale_run.py --plot-only   # redraw from the saved JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from strata.bench.client import ClientOptions, run_load
from strata.bench.metrics import summarize
from strata.bench.prompts import PromptSynthesizer, load_bench_tokenizer
from strata.bench.workload import WorkloadOptions, build_specs, build_trace, parse_window
from strata.platform.process import free_port

ROOT = Path(__file__).resolve().parents[1]
LIVE_PHASES = ("starting", "ready", "unready", "draining", "stopping")


def policy_block(policy: str, max_replicas: int, scale_down_s: int) -> dict[str, Any]:
    """The tier's autoscaling block; every policy gets the same bounds and scale-down window."""
    common = {"min_replicas": 1, "max_replicas": max_replicas,
              "behavior": {"scaleDown": {"stabilizationWindowSeconds": scale_down_s}}}
    if policy == "hpa":  # what a Kubernetes user would write: in-flight requests per pod
        return {"policy": "hpa", **common, "metrics": [
            {"name": "concurrency", "source": "replica", "type": "AverageValue",
             "average_value": 4}]}
    if policy in ("llm", "predictive"):
        return {"policy": policy, **common}
    raise SystemExit(f"unknown policy {policy!r}; use hpa, llm or predictive")


def cluster_file(args: argparse.Namespace, policy: str, port: int, out: Path) -> dict[str, Any]:
    """The cluster file of one run; each policy ticks at its original's period."""
    period = {"hpa": 15, "llm": 5, "predictive": 5}[policy]
    return {
        "engine": {"threads": 1, "kv_cache": args.kv_cache, "max_num_seqs": 16},
        "tiers": {"engine": {"replicas": 1, "autoscaling": policy_block(
            policy, args.max_replicas, args.scale_down_window_s)}},
        "autoscaler": {"period_s": period, "window_s": 60,
                       "decision_log": str(out / f"decisions_{policy}.jsonl")},
        "slos": {"ttft_s": args.ttft_slo_s, "tpot_s": args.tpot_slo_s},
        "gateway": {"port": port, "hold_timeout_s": 300},
        "platform": {"log_dir": str(out / f"replicas_{policy}"), "drain_timeout_s": 300},
    }


def start(config: dict[str, Any], path: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``strata serve -f path`` (via its entry function), up once one replica is ready."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from strata.cluster "
         "import serve_cluster; serve_cluster(Path(sys.argv[1]))", str(path)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{config['gateway']['port']}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the cluster exited; see {log}")
        try:
            tiers = httpx.get(url + "/admin/status", timeout=2).json()["tiers"]
            if tiers[0]["ready"] >= 1:
                return proc, url
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("no replica became ready within 600 s")


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a person would."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def integrate(series: list[dict[str, float]], end_s: float) -> float:
    """Seconds x value of a step series sampled at t_s, from its first sample to end_s."""
    total = 0.0
    for a, b in zip(series, series[1:] + [{"t_s": end_s, "value": 0.0}], strict=True):
        total += a["value"] * max(0.0, min(b["t_s"], end_s) - a["t_s"])
    return total


def live_series(timeseries: dict[str, list[Any]]) -> list[dict[str, float]]:
    """Existing replicas over time: the sum of the live phases at each scrape."""
    by_t: dict[float, float] = {}
    for key, samples in timeseries.items():
        if key.startswith("strata_platform_replicas") and any(
                f'phase="{p}"' in key for p in LIVE_PHASES):
            for s in samples:
                by_t[s.t_s] = by_t.get(s.t_s, 0.0) + s.value
    return [{"t_s": t, "value": v} for t, v in sorted(by_t.items())]


def pick(timeseries: dict[str, list[Any]], prefix: str) -> list[dict[str, float]]:
    """One scraped series by name prefix (label order is fixed by the scraper)."""
    for key, samples in timeseries.items():
        if key.startswith(prefix):
            return [{"t_s": s.t_s, "value": s.value} for s in samples]
    return []


def run_policy(args: argparse.Namespace, policy: str, out: Path) -> dict[str, Any]:
    """One cluster, one replay, one result file."""
    workload = WorkloadOptions(trace=args.trace, data_dir=args.data_dir,
                               window=parse_window(args.window), rate_scale=args.rate_scale,
                               length_factor=args.length_factor, seed=args.seed)
    trace = build_trace(workload)
    synthesizer = PromptSynthesizer(load_bench_tokenizer(None), seed=args.seed)
    specs, _ = build_specs(trace, synthesizer, "text")
    (out / f"decisions_{policy}.jsonl").unlink(missing_ok=True)
    config = cluster_file(args, policy, free_port(), out)
    print(f"[{policy}] starting the cluster ({len(specs)} requests to replay)", flush=True)
    proc, url = start(config, out / f"cluster_{policy}.yaml", out / f"cluster_{policy}.log")
    load_before = os.getloadavg()
    try:
        client = ClientOptions(target=url, api="completions", model="SmolLM2-135M-Instruct",
                               ignore_eos=True, timeout_s=900, scrape_interval_s=1.0)
        t0 = time.monotonic()
        output = asyncio.run(run_load(specs, client))
        wall = time.monotonic() - t0
    finally:
        stop(proc)
    decisions = [json.loads(line) for line in
                 (out / f"decisions_{policy}.jsonl").read_text().splitlines()]
    records = output.records
    end_s = max((r.sent_s + (r.e2e_s or 0.0)) for r in records)
    live = live_series(output.timeseries)
    summary = summarize(records, args.ttft_slo_s * 1000, args.tpot_slo_s * 1000, True, 50.0)
    ttfts = sorted(r.ttft_s for r in records if r.ttft_s is not None)
    result = {
        "policy": policy, "cluster_file": config, "trace": trace.name,
        "transforms": list(trace.transforms), "requests": len(records), "wall_s": wall,
        "end_s": end_s, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "replica_seconds": integrate(live, end_s),
        "ready_replica_seconds": integrate(pick(output.timeseries, "strata_tier_replicas"),
                                           end_s),
        "ok": sum(1 for r in records if r.status == "ok"),
        "ttft_p50_s": _q(ttfts, 0.5), "ttft_p90_s": _q(ttfts, 0.9), "ttft_p99_s": _q(ttfts, 0.99),
        "ttft_slo_attainment": sum(1 for t in ttfts if t <= args.ttft_slo_s) / max(1, len(records)),
        "scale_ups": sum(1 for d in decisions if d["desired"] > d["current"]),
        "scale_downs": sum(1 for d in decisions if d["desired"] < d["current"]),
        "summary": summary.model_dump() if hasattr(summary, "model_dump") else str(summary),
        "records": [{"scheduled_s": r.scheduled_s, "sent_s": r.sent_s, "status": r.status,
                     "ttft_s": r.ttft_s, "e2e_s": r.e2e_s, "prompt_tokens": r.prompt_tokens,
                     "output_tokens": r.output_tokens} for r in records],
        "live_replicas": live,
        "ready_replicas": pick(output.timeseries, "strata_tier_replicas"),
        "desired_replicas": pick(output.timeseries, "strata_autoscaler_desired_replicas"),
        "decisions": decisions,
    }
    (out / f"autoscale_{policy}.json").write_text(json.dumps(result, indent=1))
    return result


def _q(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


def table(results: list[dict[str, Any]], slo_s: float) -> str:
    """The markdown table docs/results.md quotes."""
    lines = ["| policy | requests ok | run span (s) | replica-seconds (existing) | mean replicas "
             f"| ready replica-seconds | TTFT p50 / p90 / p99 (s) | TTFT <= {slo_s:g} s "
             "| scale ups / downs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = "/".join("-" if r[k] is None else f"{r[k]:.2f}"
                     for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s"))
        lines.append(f"| {r['policy']} | {r['ok']}/{r['requests']} | {r['end_s']:.0f} "
                     f"| {r['replica_seconds']:.0f} | {r['replica_seconds'] / r['end_s']:.2f} "
                     f"| {r['ready_replica_seconds']:.0f} | {p} | "
                     f"{r['ttft_slo_attainment']:.0%} | {r['scale_ups']} / {r['scale_downs']} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, slo_s: float, bin_s: float = 10.0) -> None:
    """Rate, replicas and TTFT over time; one column per policy, shared axes per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(results), figsize=(5.5 * len(results), 8), sharex=True,
                             sharey="row", squeeze=False)
    for col, r in enumerate(results):
        recs = r["records"]
        end = max(r["end_s"], 1.0)
        nbins = int(math.ceil(end / bin_s))
        counts = [0] * nbins
        for rec in recs:
            counts[min(nbins - 1, int(rec["scheduled_s"] // bin_s))] += 1
        ax = axes[0][col]
        ax.bar([i * bin_s for i in range(nbins)], [c / bin_s for c in counts], width=bin_s,
               align="edge", color="tab:gray")
        ax.set_title(f"{r['policy']}: {r['replica_seconds']:.0f} replica-s")
        ax = axes[1][col]
        for key, label, color, width, dash in (
                ("live_replicas", "existing", "tab:orange", 4.0, "-"),
                ("ready_replicas", "ready", "tab:green", 2.0, "-"),
                ("desired_replicas", "desired", "tab:blue", 1.2, "--")):
            s = r[key]
            if s:
                ax.step([p["t_s"] for p in s], [p["value"] for p in s], where="post",
                        label=label, color=color, linewidth=width, linestyle=dash)
        ax.set_ylim(0, r["cluster_file"]["tiers"]["engine"]["autoscaling"]["max_replicas"] + 0.5)
        ax.legend(loc="upper right", fontsize=8)
        ax = axes[2][col]
        ok = [x for x in recs if x["ttft_s"] is not None]
        ax.scatter([x["scheduled_s"] for x in ok], [x["ttft_s"] for x in ok], s=8)
        ax.axhline(slo_s, color="tab:red", linestyle="--", linewidth=1, label="TTFT SLO")
        ax.set_yscale("log")
        ax.set_xlabel("time in the run (s)")
        ax.legend(loc="upper right", fontsize=8)
    axes[0][0].set_ylabel("requests/s (10 s bins)")
    axes[1][0].set_ylabel("replicas")
    axes[2][0].set_ylabel("TTFT (s)")
    fig.suptitle(f"strata serve, {results[0]['trace']} ({', '.join(results[0]['transforms'])})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Run (or re-plot) the policies and write results, plot and table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policies", default="hpa,llm,predictive")
    p.add_argument("--trace", default="azure-code")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder of the traces (default: shared/data beside the repo)")
    p.add_argument("--window", default="480:960", help="START:END seconds of the trace")
    p.add_argument("--rate-scale", type=float, default=0.03)
    p.add_argument("--length-factor", type=float, default=0.1)
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--kv-cache", default="256MiB")
    p.add_argument("--scale-down-window-s", type=int, default=60)
    p.add_argument("--ttft-slo-s", type=float, default=5.0)
    p.add_argument("--tpot-slo-s", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=ROOT / "results" / "autoscale")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    results = []
    for policy in policies:
        path = out / f"autoscale_{policy}.json"
        if args.plot_only:
            results.append(json.loads(path.read_text()))
        else:
            results.append(run_policy(args, policy, out))
    md = table(results, args.ttft_slo_s)
    print(md)
    (out / "autoscale_run.md").write_text(md + "\n")
    plot(results, out / "autoscale_run.png", args.ttft_slo_s)
    print(f"plot: {out / 'autoscale_run.png'}")


if __name__ == "__main__":
    main()
