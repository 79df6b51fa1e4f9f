"""Where per-stage scaling wins: a 70B model over A100s (and H100s), on the simulator's roofline.

    python benchmarks/sim_stages.py

Three questions, each answered from the simulator's GPU cost model
(``strata.sim.perf_model.RooflineCost``: the same roofline, efficiency factors and start-up
model ``strata simulate`` uses):

1. **Stage costs.** Llama-3-70B (80 layers, 128k vocabulary, bf16, 141 GB of weights) as a
   4-stage pipeline on A100-80GB, one decode micro-batch of ``--batch`` sequences at several
   context lengths: each stage's step time, so the bottleneck and its margin are numbers.
   Three layouts: equal layer split on 4 A100s; the same with the last stage (LM head) on an
   A100 and the rest on H100s (mixed GPU types); long-context attention (32k).
2. **Marginal gain.** A discrete-event model of the pipeline with per-stage replica sets:
   ``M`` micro-batches circulate (the head sends the next step of a micro-batch when its
   tokens come back), each pinned at every stage to one replica (round robin, as the head
   pins sequences), each stage replica serving its queue in order. Adding a replica to the
   bottleneck stage: the measured throughput gain against its ideal,
   ``min(next bottleneck, (r+1)/r x bottleneck) - current``.
3. **A day.** The paper day's arrival curve (``strata.sim.experiments.day_trace``, 24 h,
   peak/trough 4), scaled so its peak needs ``--peak-pipelines`` pipelines; per minute, the
   GPUs that whole-pipeline scaling needs (stages x ceil(demand / pipeline capacity)) against
   per-stage scaling (sum over stages of ceil(demand / stage capacity)), each added GPU
   paying its start-up (the oracle schedule of ``strata.sim.experiments.oracle``, applied
   to both, so neither has a forecasting advantage).

Writes ``results/sim_stages.json`` and ``.md``. This is the cost model plus a queueing model
of the pipeline, not the full simulator: ``strata simulate`` runs a unit as one pipeline and
does not yet scale stages separately.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from pathlib import Path
from typing import Any

from strata.bench.traces import fit_lengths, load_trace
from strata.engine.model_config import LlamaConfig
from strata.sim.experiments import DayOptions, day_trace, rates
from strata.sim.hardware import HARDWARE, ModelCosts
from strata.sim.perf_model import RooflineCost, StepFeatures

LLAMA3_70B = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                         num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                         max_position_embeddings=131072, name="llama-3-70b")


def stage_costs(gpus: list[str], cuts: list[int], batch: int, ctx: int) -> list[float]:
    """Step time of each stage for one decode micro-batch of ``batch`` sequences at ``ctx``."""
    m = ModelCosts.of(LLAMA3_70B)
    bounds = [0, *cuts, m.layers]
    f = StepFeatures(decodes=batch, decode_ctx=batch * ctx, sampled=batch, decode_max_ctx=ctx)
    return [RooflineCost(HARDWARE[g], m, first=a, last=b).step_s(f)
            for g, a, b in zip(gpus, bounds[:-1], bounds[1:], strict=True)]


def balanced_cuts(gpus: list[str], batch: int, ctx: int, reach: int = 8) -> list[int]:
    """Cut points within ``reach`` layers of the equal split that minimize the slowest
    stage's step time (what ``strata.stages.balanced_split`` does from measured costs)."""
    n = len(gpus)
    layers = ModelCosts.of(LLAMA3_70B).layers
    equal = [layers * (k + 1) // n for k in range(n - 1)]
    best: tuple[float, list[int]] = (math.inf, equal)

    def search(k: int, chosen: list[int]) -> None:
        nonlocal best
        if k == n - 1:
            t = max(stage_costs(gpus, chosen, batch, ctx))
            if t < best[0]:
                best = (t, list(chosen))
            return
        lo = max(equal[k] - reach, (chosen[-1] + 1) if chosen else 1)
        for c in range(lo, min(equal[k] + reach, layers - (n - 1 - k)) + 1):
            search(k + 1, [*chosen, c])

    search(0, [])
    return best[1]


def pipeline_throughput(times: list[float], replicas: list[int], inflight: int,
                        horizon_steps: int = 4000) -> float:
    """Micro-batches per second through a pipeline with per-stage replica sets (module
    docstring, point 2): ``inflight`` micro-batches circulate, each pinned at stage ``s``
    to replica ``i mod replicas[s]``."""
    free_at = [[0.0] * r for r in replicas]
    events = [(0.0, i, 0) for i in range(inflight)]  # (ready time, micro-batch, stage)
    heapq.heapify(events)
    done = 0
    t_end = 0.0
    warm = horizon_steps // 5
    t_warm = 0.0
    while done < horizon_steps:
        t, i, s = heapq.heappop(events)
        k = i % replicas[s]
        start = max(t, free_at[s][k])
        free_at[s][k] = finish = start + times[s]
        if s + 1 < len(times):
            heapq.heappush(events, (finish, i, s + 1))
        else:
            done += 1
            if done == warm:
                t_warm = finish
            t_end = finish
            heapq.heappush(events, (finish, i, 0))
    return (done - warm) / (t_end - t_warm)


def marginal(times: list[float], per_path: int, fixed: bool = False) -> list[dict[str, Any]]:
    """Add replicas one by one to the current bottleneck; measured vs ideal gain each time.

    In flight: ``per_path`` micro-batches per pipeline path (the head's ``max_inflight``,
    default the stage count), the paths being as many as the largest replica set; with
    ``fixed`` the in-flight count stays at one path's."""
    reps = [1] * len(times)
    out = []

    def inflight() -> int:
        return per_path if fixed else per_path * max(reps)

    cur = pipeline_throughput(times, reps, inflight())
    for _ in range(len(times) + 2):
        caps = [r / t for r, t in zip(reps, times, strict=True)]
        b = min(range(len(caps)), key=caps.__getitem__)
        after = list(caps)
        after[b] = (reps[b] + 1) / times[b]
        ideal = min(after) - min(caps)
        reps[b] += 1
        new = pipeline_throughput(times, reps, inflight())
        out.append({"stage": b, "replicas": list(reps), "gpus": sum(reps),
                    "throughput": new, "gain": new - cur, "ideal_gain": ideal,
                    "ratio": (new - cur) / ideal if ideal > 0 else float("nan")})
        cur = new
    return out


def day_gpu_hours(times: list[float], startup_s: float, peak_pipelines: float,
                  data_dir: Path | None) -> dict[str, float]:
    """GPU-hours of whole-pipeline vs per-stage scaling over the day (module docstring)."""
    base = fit_lengths(load_trace("azure-conv", data_dir), 1.0, 4096)
    curve = rates(day_trace(base, DayOptions()), 60.0)
    cap_stage = [1.0 / t for t in times]  # micro-batches/s per stage replica
    cap_pipe = min(cap_stage)
    scale = peak_pipelines * cap_pipe / max(curve)
    demand = [r * scale for r in curve]
    whole = [len(times) * math.ceil(d / cap_pipe - 1e-9) for d in demand]
    stage = [sum(math.ceil(d / c - 1e-9) for c in cap_stage) for d in demand]

    def gpu_hours(series: list[int]) -> float:
        gpu_s = sum(series) * 60.0
        prev = series[0]
        for n in series:
            gpu_s += max(0, n - prev) * startup_s
            prev = n
        return gpu_s / 3600.0

    return {"whole_pipeline_gpu_hours": gpu_hours(whole),
            "per_stage_gpu_hours": gpu_hours(stage),
            "ratio": gpu_hours(stage) / gpu_hours(whole),
            "peak_whole_gpus": max(whole), "peak_stage_gpus": max(stage),
            "fluid_gpu_hours": sum(d * sum(1.0 / c for c in cap_stage) for d in demand) * 60
            / 3600.0}


LAYOUTS: dict[str, tuple[list[str], list[int] | None, int]] = {
    "4xA100, equal split, 4k ctx": (["a100-80g"] * 4, [20, 40, 60], 4096),
    "4xA100, equal split, 32k ctx": (["a100-80g"] * 4, [20, 40, 60], 32768),
    "3xH100 + A100 tail, equal split, 4k": (["h100-80g"] * 3 + ["a100-80g"], [20, 40, 60], 4096),
    "3xH100 + A100 tail, split balanced by cost, 4k": (["h100-80g"] * 3 + ["a100-80g"], None,
                                                       4096),
    "4xA100, split balanced by cost, 4k": (["a100-80g"] * 4, None, 4096),
}


def main(argv: list[str] | None = None) -> None:
    """Print the three tables and write the results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="sequences per decode micro-batch")
    p.add_argument("--inflight", type=int, default=4,
                   help="micro-batches in flight per path (the head's max_inflight)")
    p.add_argument("--peak-pipelines", type=float, default=6.5)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--output", type=Path, default=Path("results/sim_stages.json"))
    args = p.parse_args(argv)
    startup_s = RooflineCost(HARDWARE["a100-80g"], ModelCosts.of(LLAMA3_70B), first=0,
                             last=20).startup_s()
    doc: dict[str, Any] = {"command": " ".join(["python", "benchmarks/sim_stages.py",
                                                *(argv or sys.argv[1:])]),
                           "batch": args.batch, "inflight": args.inflight,
                           "stage_startup_s": startup_s, "layouts": {}}
    md = ["| layout | cuts, stage step ms | bottleneck / mean | added to | GPUs | measured gain / "
          "ideal (in flight fixed at one path's) | day GPU-hours stage / whole |",
          "|---|---|--:|--:|--:|--:|--:|"]
    for name, (gpus, cuts, ctx) in LAYOUTS.items():
        if cuts is None:
            cuts = balanced_cuts(gpus, args.batch, ctx)
        times = stage_costs(gpus, cuts, args.batch, ctx)
        steps = marginal(times, args.inflight)
        steps_fixed = marginal(times, args.inflight, fixed=True)
        day = day_gpu_hours(times, startup_s, args.peak_pipelines, args.data_dir)
        doc["layouts"][name] = {"gpus": gpus, "cuts": cuts, "ctx": ctx,
                                "stage_step_s": times, "marginal": steps,
                                "marginal_fixed_inflight": steps_fixed, "day": day}
        for k, (st, sf) in enumerate(zip(steps[:4], steps_fixed[:4], strict=True)):
            head = k == 0
            ratio = (f"{st['ratio']:.2f} ({sf['ratio']:.2f})" if st["ideal_gain"] > 0
                     else "- (a tied stage remains: ideal 0)")
            md.append(f"| {name if head else ''} | "
                      f"{cuts if head else ''} "
                      f"{' / '.join(f'{t * 1e3:.1f}' for t in times) if head else ''} | "
                      f"{format(max(times) / (sum(times) / len(times)), '.3f') if head else ''} | "
                      f"stage {st['stage']} | {st['gpus']} | {ratio} | "
                      f"{format(day['ratio'], '.3f') if head else ''} |")
    text = "\n".join(md)
    print(text)
    for name, lay in doc["layouts"].items():
        d = lay["day"]
        print(f"{name}: day whole {d['whole_pipeline_gpu_hours']:.0f} GPU-h, per-stage "
              f"{d['per_stage_gpu_hours']:.0f} GPU-h ({d['ratio']:.3f}x), fluid "
              f"{d['fluid_gpu_hours']:.0f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1))
    args.output.with_suffix(".md").write_text(text + "\n")
    print(f"results: {args.output}")


if __name__ == "__main__":
    main()
