"""From a cluster file, a hardware/model choice and a trace to a runnable simulation.

The cluster file (``strata.config.ClusterConfig``) is the very one ``strata serve`` reads:
a tier's engine options size its simulated engines (one tier per setup; a file with
several is simulated tier by tier, ``strata.sim.tiers``), its routing and autoscaling blocks
pick the policies, its SLOs and autoscaler period/window drive the control loop. KV
blocks: the engine's ``num_kv_blocks`` if set, else what fits the GPU beside the weights
(GPU hardware) or the engine's ``kv_cache`` bytes (cpu-local, as ``strata engine`` sizes it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from strata.bench.traces import Trace
from strata.config import ClusterConfig
from strata.sim.cluster import SimCluster, SimSetup, SimStats
from strata.sim.perf_model import ReplicaModel
from strata.sim.types import EngineSettings, SimRequest


@dataclass(frozen=True)
class SimOptions:
    """Simulator choices that are not part of the cluster file."""

    stages: int = 1  # >1: each unit is a layer-stage pipeline with one virtual engine per stage
    prefix_caching: str = "auto"  # auto: on when the trace carries prefix hash ids | on | off
    fast_forward: bool = True
    initial_units: int | None = None  # None: the tier's initial replicas
    sample_period_s: float = 10.0
    tail_s: float = 3600.0


def engine_settings(cfg: ClusterConfig, replica: ReplicaModel, stages: int,
                    prefix_caching: bool, tier: str | None = None) -> EngineSettings:
    """The simulated engines' limits and KV size from the tier's (default: first) engine options."""
    opts = cfg.engine_for(tier or cfg.default_tier)
    max_len = min(opts.max_model_len or replica.max_model_len, replica.max_model_len)
    if opts.num_kv_blocks is not None:
        blocks = opts.num_kv_blocks
    elif replica.kv_tokens is not None:
        blocks = replica.kv_tokens // stages // opts.block_size
    else:
        blocks = int(opts.kv_cache_bytes // (replica.kv_bytes_per_token * opts.block_size))
    if blocks < 1:
        raise ValueError("the KV cache holds no block: raise engine.kv_cache or num_kv_blocks")
    return EngineSettings(num_blocks=blocks, block_size=opts.block_size,
                          max_num_seqs=opts.max_num_seqs,
                          max_num_batched_tokens=opts.max_num_batched_tokens,
                          max_model_len=max_len, prefix_caching=prefix_caching)


def build_setup(cfg: ClusterConfig, replica: ReplicaModel, trace: Trace,
                options: SimOptions | None = None, tier_name: str | None = None) -> SimSetup:
    """A SimSetup for one tier of the cluster file (default: the first)."""
    o = options or SimOptions()
    name = tier_name or cfg.default_tier
    tier = cfg.tiers[name]
    has_hashes = trace.block_tokens is not None and any(r.hash_ids for r in trace.records)
    if o.prefix_caching not in ("auto", "on", "off"):
        raise ValueError(f"--prefix-caching must be auto, on or off, got {o.prefix_caching!r}")
    caching = cfg.engine_for(name).prefix_caching and (
        o.prefix_caching == "on" or (o.prefix_caching == "auto" and has_hashes))
    engine = engine_settings(cfg, replica, o.stages, caching, name)
    slos = cfg.slos
    return SimSetup(
        replica=replica, engine=engine, tier=name,
        initial_units=tier.initial_replicas if o.initial_units is None else o.initial_units,
        autoscaling=cfg.autoscaling_for(name),
        routing_policy=cfg.routing.policy, routing_params=dict(cfg.routing.params),
        virtual_engines=o.stages, poll_interval_s=cfg.gateway.poll_interval_s,
        hold_timeout_s=cfg.gateway.hold_timeout_s,
        autoscaler_period_s=cfg.autoscaler.period_s
        if "period_s" in cfg.autoscaler.model_fields_set else None,
        window_s=cfg.autoscaler.window_s, sample_period_s=o.sample_period_s,
        slo_ttft_s=slos.ttft_s or float("inf"), slo_tpot_s=slos.tpot_s or float("inf"),
        prefix_block_tokens=trace.block_tokens if has_hashes else None,
        fast_forward=o.fast_forward, tail_s=o.tail_s)


def requests_from_trace(trace: Trace) -> list[SimRequest]:
    """One SimRequest per trace record, in arrival order."""
    return [SimRequest(i, r.arrival_s, r.input_tokens, r.output_tokens, r.hash_ids)
            for i, r in enumerate(trace.records)]


def simulate(setup: SimSetup, trace: Trace) -> tuple[SimCluster, SimStats]:
    """Run one simulation to completion."""
    cluster = SimCluster(setup)
    stats = cluster.run(requests_from_trace(trace))
    return cluster, stats


def describe(setup: SimSetup, trace: Trace, extra: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """What was simulated, for the result file."""
    r = setup.replica
    auto = setup.autoscaling
    return {
        "trace": trace.name, "transforms": list(trace.transforms),
        "length_factor": trace.length_factor, "clipped_requests": trace.clipped_requests,
        "requests": len(trace.records), "hardware": r.hardware, "model": r.model_name,
        "gpus_per_unit": r.gpus, "virtual_engines_per_unit": setup.virtual_engines,
        "startup_s": r.startup_s, "engine": vars(setup.engine),
        "routing": {"policy": setup.routing_policy, "params": setup.routing_params},
        "autoscaling": auto.model_dump(mode="json") if auto is not None else None,
        "initial_units": setup.initial_units, "slo_ttft_s": setup.slo_ttft_s,
        "slo_tpot_s": setup.slo_tpot_s, **(extra or {}),
    }


def with_units(setup: SimSetup, units: int) -> SimSetup:
    """The same tier with a fixed number of units and no autoscaler (a static deployment)."""
    return replace(setup, initial_units=units, autoscaling=None)
