"""Several tiers in ``strata simulate``: a trace's requests shared among the tiers' models.

Traces carry no model name (Azure's and Mooncake's rows are arrival time and lengths), so
each request is given to a tier by a seeded weighted draw over the served model names:
``--model-share NAME=WEIGHT`` (repeatable; names left out get no requests), by default
equal shares. Arrival times are kept, so every tier sees its share of the same timeline.

In strata the tiers share nothing on the request path (each has its own replicas, its own
lane in the gateway with its own policy instance, and its own autoscaler), so each tier
runs as its own simulation of its share and the result holds one document per tier plus
the totals.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from strata.bench.traces import Trace
from strata.config import ClusterConfig
from strata.sim.cluster import SimCluster, SimSetup, SimStats
from strata.sim.perf_model import ReplicaModel
from strata.sim.report import result_document
from strata.sim.scenario import SimOptions, build_setup, describe, simulate


def model_shares(cfg: ClusterConfig, items: list[str]) -> dict[str, float]:
    """``["chat=3", "batch=1"]`` -> served model -> weight; no items: equal weights."""
    served = cfg.served_models()
    if not items:
        return dict.fromkeys(served, 1.0)
    shares = dict.fromkeys(served, 0.0)
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in served:
            raise ValueError(f"--model-share {item!r} must be NAME=WEIGHT with NAME one of the "
                             f"served models: {', '.join(served)}")
        try:
            weight = float(raw)
        except ValueError:
            raise ValueError(f"--model-share {item!r}: the weight must be a number") from None
        if not weight >= 0:
            raise ValueError(f"--model-share {item!r}: the weight must be >= 0")
        shares[name] = weight
    if sum(shares.values()) <= 0:
        raise ValueError("--model-share: at least one model needs a weight above 0")
    return shares


def split_trace(trace: Trace, shares: dict[str, float], seed: int) -> dict[str, Trace]:
    """Each record to one model, drawn with ``shares`` as weights (deterministic per seed)."""
    names = list(shares)
    total = sum(shares.values())
    drawn = random.Random(seed).choices(names, weights=[shares[n] for n in names],
                                        k=len(trace.records))
    out = {}
    for name in names:
        records = tuple(r for r, d in zip(trace.records, drawn, strict=True) if d == name)
        out[name] = replace(trace, records=records, transforms=(
            *trace.transforms, f"model {name}: share {shares[name] / total:.3g}"))
    return out


@dataclass(frozen=True)
class TierRun:
    """One tier's simulation: its model, setup, share of the trace and results."""

    tier: str
    model: str
    setup: SimSetup
    trace: Trace
    cluster: SimCluster
    stats: SimStats


def simulate_tiers(cfg: ClusterConfig, replica: ReplicaModel, trace: Trace,
                   options: SimOptions, shares: dict[str, float], seed: int) -> list[TierRun]:
    """Every tier of the file on its share of ``trace``, in file order."""
    parts = split_trace(trace, shares, seed)
    runs = []
    for model, tier in cfg.served_models().items():
        part = parts[model]
        setup = build_setup(cfg, replica, part, options, tier)
        cluster, stats = simulate(setup, part)
        runs.append(TierRun(tier, model, setup, part, cluster, stats))
    return runs


def tiers_document(runs: list[TierRun], extra: dict[str, Any], *,
                   with_requests: bool = False) -> dict[str, Any]:
    """The result file of a several-tier run: one document per tier, and the totals."""
    tiers = {r.tier: result_document(r.cluster, r.stats, describe(r.setup, r.trace, {
        "served_model": r.model, **extra}), with_requests=with_requests) for r in runs}
    summaries = [d["summary"] for d in tiers.values()]
    requests = sum(s["requests"] for s in summaries)
    good = sum(s["slo_attainment"] * s["requests"] for s in summaries)
    return {
        "config": {"tiers": {r.tier: r.model for r in runs}, **extra},
        "summary": {
            "requests": requests,
            "completed": sum(s["completed"] for s in summaries),
            "slo_attainment": good / requests if requests else 0.0,
            "provisioned_gpu_hours": sum(s["gpu"]["provisioned_gpu_hours"] for s in summaries),
            "busy_gpu_hours": sum(s["gpu"]["busy_gpu_hours"] for s in summaries),
        },
        "tiers": tiers,
    }
