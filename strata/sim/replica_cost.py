"""Which cost model a replica gets, from the CLI's ``--hardware/--model/--tp/--stages``.

Apart from ``perf_model`` because the cpu-local choice reads a measured profile
(``cpu_profile``), which itself fits the perf model's features: one module above both.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from strata.sim.cpu_profile import CpuProfile
from strata.sim.hardware import CPU_LOCAL, HARDWARE, ModelCosts, hardware_names, load_model_shape
from strata.sim.perf_model import LinearCost, PipelineCost, ReplicaModel, RooflineCost


def build_replica_model(
    hardware: str,
    model: str,
    *,
    tp: int = 1,
    stages: int = 1,
    profile_path: Path | None = None,
    gpu_overrides: dict[str, float] | None = None,
) -> ReplicaModel:
    """Assemble the cost model of one replica from the CLI's ``--hardware/--model`` choices."""
    if hardware == CPU_LOCAL:
        if tp != 1 or stages != 1:
            raise ValueError("cpu-local replicas are one engine process: use --tp 1 --stages 1")
        if profile_path is None:
            raise ValueError("--hardware cpu-local needs --profile (see `strata simulate profile`)")
        prof = CpuProfile.load(profile_path)
        shape = load_model_shape(model)
        return ReplicaModel(LinearCost(prof.coefficients), 0, None, prof.kv_bytes_per_token,
                            prof.startup_s,
                            prof.request_overhead_s, shape.name,
                            shape.max_position_embeddings, hardware)
    if hardware not in HARDWARE:
        raise ValueError(f"--hardware {hardware!r}: use one of {', '.join(hardware_names())}")
    gpu = HARDWARE[hardware]
    if gpu_overrides:
        gpu = replace(gpu, **gpu_overrides)
    shape = load_model_shape(model)
    costs = ModelCosts.of(shape)
    if not 1 <= stages <= costs.layers:
        raise ValueError(f"--stages must be in [1, {costs.layers}], got {stages}")
    if stages == 1:
        part = RooflineCost(gpu, costs, tp)
        return ReplicaModel(part, tp, part.kv_capacity_tokens(), part.kv_bytes_per_token,
                            part.startup_s(), 0.0,
                            shape.name, shape.max_position_embeddings, hardware)
    bounds = [round(i * costs.layers / stages) for i in range(stages + 1)]
    parts = tuple(RooflineCost(gpu, costs, tp, bounds[i], bounds[i + 1])
                  for i in range(stages))
    # Every stage holds a slice of each token's KV: the pipeline holds as many tokens as
    # its most constrained stage does.
    kv = min(p.kv_capacity_tokens() for p in parts)
    startup = max(p.startup_s() for p in parts)
    return ReplicaModel(PipelineCost(parts), tp * stages, kv, costs.kv_bytes_per_token(
        costs.layers, parts[0].dtype_bytes), startup, 0.0, shape.name,
                        shape.max_position_embeddings, hardware)
