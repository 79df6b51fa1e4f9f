"""The paper's experiment: a day of LLaMA-2-13B traffic on A100s, five ways, plus an oracle.

**The day-shaped load** (``day_trace``) is built from the one-hour Azure conversation
trace, exactly so: the hour is tiled back to back (period = its span plus one mean gap)
``hours`` times; each tiled request at time ``t`` is then kept ``floor(m)`` times plus once
more with probability ``frac(m)`` (seeded), extra copies placed uniformly between it and
the next arrival, where ``m = rate_scale * (1 + A cos(2 pi (t/3600 - peak_hour) / 24))``
and ``A = (R - 1) / (R + 1)`` for a peak-to-trough ratio ``R``. The mean of the diurnal
factor over a day is 1, so ``rate_scale`` is the day's mean multiple of the trace's rate;
prompt and output lengths, and the trace's burstiness within each hour, are unchanged.

**Capacity** of one unit (``calibrate``): the highest rate scale of a 20-minute trace
window that one static unit serves with at least 90 % SLO attainment (bisection).

Lengths are those of the trace, except that a request longer than the model's context
(4096 for LLaMA-2) has its prompt clipped to fit (``strata.bench.traces.fit_lengths``; the
count is reported).

**The configurations** (``configurations``): (1) static, sized for the mean rate, (2)
static, sized for the peak 10-minute rate, both round-robin as a Kubernetes Service, (3)
Kubernetes' HPA on GPU utilisation (70 % target, Kubernetes' default behaviour),
round-robin, (4) ``resource_match`` routing with the ``llm`` autoscaler and (4p) with the
``predictive`` one (which falls back to ``llm`` while its forecast errs), (5) (4p) with
two-stage layer pipelines per unit. The autoscalers start from the units the first ten
minutes need, warm, and may grow to twice the peak sizing.

**The oracle** (``oracle``): a schedule that knows the future runs, in each minute,
``ceil(rate / capacity)`` whole-model units and starts each added unit ``startup_s`` early.
It is a reference, not a strict bound: the capacity is one lone unit's at the attainment
target, and a pool of units absorbs bursts better than one, so a policy may come in under
it. The fluid figure (every request at the best per-GPU SLO capacity of the unit kinds, no
rounding to whole units, no start-up, no idle time) is lower still, and is a lower bound
only as far as no unit serves more than its calibrated capacity within the SLO. A unit's
throughput past that point does not make a stricter bound: fed three times its capacity, a
LLaMA-2-13B unit completes *fewer* requests per second than at capacity, because the
scheduler preempts and recomputes sequences when the KV cache fills.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from strata.bench.traces import Trace, TraceRecord, fit_lengths, scale_rate, window
from strata.config import parse_cluster_config
from strata.sim.replica_cost import build_replica_model
from strata.sim.report import summarize
from strata.sim.scenario import SimOptions, build_setup, simulate

HOUR_S = 3600.0


@dataclass(frozen=True)
class DayOptions:
    """Shape of the synthetic day (module docstring)."""

    hours: float = 24.0
    rate_scale: float = 1.0
    peak_to_trough: float = 4.0
    peak_hour: float = 14.0
    seed: int = 0
    period_hours: float = 24.0  # < 24: a compressed day (the cosine's period)


def diurnal_factor(t_s: float, peak_to_trough: float, peak_hour: float,
                   period_hours: float = 24.0) -> float:
    """Mean-one daily rate factor at ``t_s`` seconds after midnight."""
    amp = (peak_to_trough - 1.0) / (peak_to_trough + 1.0)
    return 1.0 + amp * math.cos(2.0 * math.pi * (t_s / HOUR_S - peak_hour) / period_hours)


def day_trace(base: Trace, opts: DayOptions) -> Trace:
    """Tile ``base`` over the day and modulate its rate (module docstring)."""
    if opts.peak_to_trough < 1.0 or opts.rate_scale <= 0 or opts.hours <= 0:
        raise ValueError("day: peak_to_trough >= 1, rate_scale > 0 and hours > 0 are required")
    recs = base.records
    if len(recs) < 2:
        raise ValueError("day: the base trace needs at least two requests")
    period = base.duration_s + base.duration_s / (len(recs) - 1)
    rng = random.Random(opts.seed)
    horizon = opts.hours * HOUR_S
    out: list[TraceRecord] = []
    tile = 0
    while tile * period < horizon:
        offset = tile * period
        for i, rec in enumerate(recs):
            t = offset + rec.arrival_s
            if t >= horizon:
                break
            m = opts.rate_scale * diurnal_factor(t, opts.peak_to_trough, opts.peak_hour,
                                                 opts.period_hours)
            copies = math.floor(m) + (1 if rng.random() < m % 1 else 0)
            nxt = offset + recs[i + 1].arrival_s if i + 1 < len(recs) else offset + period
            for k in range(copies):
                dt = 0.0 if k == 0 else rng.random() * (nxt - t)
                out.append(replace(rec, arrival_s=t + dt))
        tile += 1
    out.sort(key=lambda r: r.arrival_s)
    label = (f"day {opts.hours:g} h x{opts.rate_scale:g} peak/trough {opts.peak_to_trough:g} "
             f"peak {opts.peak_hour:g}h seed {opts.seed}"
             + (f" period {opts.period_hours:g} h" if opts.period_hours != 24.0 else ""))
    return replace(base, name=f"{base.name}-day", records=tuple(out),
                   transforms=(*base.transforms, label))


def peak_rate(trace: Trace, bin_s: float) -> float:
    """Highest mean arrival rate over bins of ``bin_s`` seconds."""
    return max(rates(trace, bin_s), default=0.0)


def rates(trace: Trace, bin_s: float) -> list[float]:
    """Arrival rate (req/s) per bin of ``bin_s`` seconds from time 0."""
    if not trace.records:
        return []
    n = int(trace.records[-1].arrival_s // bin_s) + 1
    counts = [0] * n
    for r in trace.records:
        counts[int(r.arrival_s // bin_s)] += 1
    return [c / bin_s for c in counts]


# -- the experiment -----------------------------------------------------------------------


@dataclass(frozen=True)
class PaperOptions:
    """Everything that defines the experiment (defaults: the paper's setting)."""

    hardware: str = "a100-80g"
    model: str = "llama-2-13b"
    day: DayOptions = field(default_factory=DayOptions)
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    max_context: int = 4096
    engine: dict[str, Any] = field(default_factory=lambda: {
        "block_size": 16, "max_num_seqs": 128, "max_num_batched_tokens": 2048})
    stages: int = 2
    hpa_target_utilization: int = 70
    max_units_factor: float = 2.0  # autoscalers may go to this multiple of the peak sizing
    calibration_window_s: float = 1200.0
    attainment_target: float = 0.9


def _cluster(opts: PaperOptions, routing: str, replicas: int,
             autoscaling: dict[str, Any] | None) -> Any:
    tier: dict[str, Any] = {"replicas": replicas}
    if autoscaling is not None:
        tier["autoscaling"] = autoscaling
    return parse_cluster_config({
        "engine": opts.engine, "tiers": {"engine": tier}, "routing": {"policy": routing},
        "slos": {"ttft_s": opts.slo_ttft_s, "tpot_s": opts.slo_tpot_s}})


def run_configuration(opts: PaperOptions, cluster: dict[str, Any], trace: Trace,
                      stages: int, units: int | None = None) -> dict[str, Any]:
    """Simulate one configuration (``{"routing", "replicas", "autoscaling"?}``) on ``trace``:
    its summary, GPU series, unit start-up, GPUs per unit and scaling decisions."""
    return _run(opts, cluster, trace, stages, units)


def _run(opts: PaperOptions, cluster: dict[str, Any], trace: Trace, stages: int,
         units: int | None = None) -> dict[str, Any]:
    cfg = _cluster(opts, cluster["routing"], cluster["replicas"], cluster.get("autoscaling"))
    replica = build_replica_model(opts.hardware, opts.model, stages=stages)
    setup = build_setup(cfg, replica, trace, SimOptions(stages=stages, initial_units=units,
                                                        sample_period_s=60.0))
    sim, stats = simulate(setup, trace)
    return {"summary": summarize(sim, stats), "series": sim.series,
            "startup_s": replica.startup_s, "gpus_per_unit": replica.gpus,
            "decisions": [d.to_dict() for d in sim.decisions if d.scales]}


def calibrate(opts: PaperOptions, base: Trace, stages: int = 1) -> dict[str, Any]:
    """Requests/s one unit sustains at the attainment target (bisection on the rate)."""
    win = window(base, 0.0, opts.calibration_window_s)
    base_rate = len(win.records) / opts.calibration_window_s
    lo, hi = 0.02, 4.0

    def attains(scale: float) -> bool:
        tr = scale_rate(win, scale, opts.day.seed)
        res = _run(opts, {"routing": "round_robin", "replicas": 1}, tr, stages, units=1)
        return res["summary"]["slo_attainment"] >= opts.attainment_target

    for _ in range(7):
        mid = (lo + hi) / 2
        if attains(mid):
            lo = mid
        else:
            hi = mid
    return {"rate_scale": lo, "capacity_rps": lo * base_rate, "stages": stages}


def configurations(opts: PaperOptions, day: Trace, cap: float, cap_stage: float,
                   mean_tokens: float) -> list[tuple[str, dict[str, Any], int]]:
    """(name, cluster settings, stages) of the five configurations."""
    mean = len(day.records) / max(day.duration_s, 1.0)
    peak = peak_rate(day, 600.0)
    n_mean = max(1, math.ceil(mean / cap))
    n_peak = max(1, math.ceil(peak / cap))
    max_units = max(2, math.ceil(opts.max_units_factor * n_peak))
    start = max(1, math.ceil(rates(day, 600.0)[0] / cap))
    hpa = {"policy": "hpa", "min_replicas": 1, "max_replicas": max_units, "metrics": [
        {"name": "custom_gpu_utilization", "type": "Utilization",
         "average_utilization": opts.hpa_target_utilization}]}

    def llm(units_max: int, capacity: float, policy: str = "llm") -> dict[str, Any]:
        return {"policy": policy, "min_replicas": 1, "max_replicas": units_max,
                "initial_capacity_tokens_per_s": capacity * mean_tokens}

    stage_max = max(2, math.ceil(max_units / opts.stages))
    stage_start = max(1, math.ceil(rates(day, 600.0)[0] / cap_stage))
    return [
        ("static-mean", {"routing": "round_robin", "replicas": n_mean}, 1),
        ("static-peak", {"routing": "round_robin", "replicas": n_peak}, 1),
        ("hpa-gpu-util", {"routing": "round_robin", "replicas": start, "autoscaling": hpa}, 1),
        ("strata-llm", {"routing": "resource_match", "replicas": start,
                        "autoscaling": llm(max_units, cap)}, 1),
        ("strata-predictive", {"routing": "resource_match", "replicas": start,
                               "autoscaling": llm(max_units, cap, "predictive")}, 1),
        ("strata-stages", {"routing": "resource_match", "replicas": stage_start,
                           "autoscaling": llm(stage_max, cap_stage, "predictive")},
         opts.stages),
    ]


def oracle(day: Trace, cap: float, startup_s: float, gpus: int, bin_s: float = 60.0,
           best_rps_per_gpu: float | None = None) -> dict[str, float]:
    """GPU-hours of the future-knowing schedule and of the fluid figure (module docstring);
    ``best_rps_per_gpu`` defaults to ``cap / gpus``."""
    per_bin = [math.ceil(r / cap - 1e-9) for r in rates(day, bin_s)]
    gpu_s = sum(per_bin) * bin_s * gpus
    prev = 0
    for n in per_bin:
        gpu_s += max(0, n - prev) * startup_s * gpus
        prev = n
    fluid = len(day.records) / max(best_rps_per_gpu or 0.0, cap / gpus)
    return {"gpu_hours": gpu_s / HOUR_S, "fluid_gpu_hours": fluid / HOUR_S,
            "peak_units": float(max(per_bin, default=0)), "bin_s": bin_s}


def _job(args: tuple[PaperOptions, str, dict[str, Any], int, Trace]) -> tuple[str, Any]:
    opts, name, cluster, stages, trace = args
    return name, _run(opts, cluster, trace, stages)


def run_paper(opts: PaperOptions, base: Trace, jobs: int = 1,
              only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Calibrate, build the day, run the configurations (in parallel), add the oracle."""
    base = fit_lengths(base, 1.0, opts.max_context)
    cal = calibrate(opts, base, 1)
    cal_stage = calibrate(opts, base, opts.stages)
    day = day_trace(base, opts.day)
    mean_tokens = sum(r.input_tokens + r.output_tokens for r in day.records) / len(day.records)
    confs = configurations(opts, day, cal["capacity_rps"], cal_stage["capacity_rps"],
                           mean_tokens)
    if only:
        confs = [c for c in confs if c[0] in only]
    work = [(opts, name, cluster, stages, day) for name, cluster, stages in confs]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = dict(pool.map(_job, work))
    else:
        results = dict(map(_job, work))
    replica = build_replica_model(opts.hardware, opts.model)
    return {
        "options": {"hardware": opts.hardware, "model": opts.model, "day": vars(opts.day),
                    "slo_ttft_s": opts.slo_ttft_s, "slo_tpot_s": opts.slo_tpot_s,
                    "engine": opts.engine, "stages": opts.stages,
                    "hpa_target_utilization": opts.hpa_target_utilization},
        "trace": {"name": day.name, "transforms": list(day.transforms),
                  "clipped_requests": base.clipped_requests,
                  "requests": len(day.records), "duration_s": day.duration_s,
                  "mean_rps": len(day.records) / max(day.duration_s, 1.0),
                  "peak_10min_rps": peak_rate(day, 600.0), "rates_600s": rates(day, 600.0)},
        "calibration": {"whole_model": cal, "stages": cal_stage},
        "configurations": {name: {"cluster": cluster, "stages": stages}
                           for name, cluster, stages in confs},
        "results": results,
        "oracle": oracle(day, cal["capacity_rps"], replica.startup_s, replica.gpus,
                         best_rps_per_gpu=cal_stage["capacity_rps"] / opts.stages),
    }
