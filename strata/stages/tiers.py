"""A stage split as platform tiers: one tier per stage, each with its own replica count.

The head tier (layers 0:a) serves the OpenAI API and owns the scheduler, so it runs one
replica per pipeline; every later stage is a tier of `strata stage --layers a:b`
processes. Outside a cluster a stage replica registers with the head itself (`--join`);
inside one (`stage_tiers` + `cluster_stage_specs`) the cluster registers each stage
replica with the head once the platform reports it ready, and again after a head
restart, so membership follows the platform as the gateway's replica list does. The
platform scales a stage tier exactly as it scales engines, and the autoscaler needs only
the stage's own signals (`strata.stages.scaling`).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from strata.config import ClusterConfig, ClusterConfigError
from strata.platform.process import ProcessSpec, available_cores, threads_per_replica
from strata.stages.plan import LayerCosts, StagesConfig, StageSpec


def stage_tier_name(layers: str) -> str:
    """'15:30' -> 'stage-15-30' (a valid tier name)."""
    return "stage-" + layers.replace(":", "-")


def stage_process_specs(
    stages: Sequence[StageSpec],
    *,
    head_url: Callable[[], str] | None,
    model: str | None = None,
    threads: int = 1,
    dtype: str = "auto",
    device: str = "auto",
    head_args: Sequence[str] = (),
    drained: Callable[[str], Awaitable[bool]] | None = None,
) -> dict[str, ProcessSpec]:
    """How to launch each stage tier's replicas; `head_url` is read at each launch.

    With `head_url`, stage replicas `--join` the head themselves (start the head tier
    first; `--join` retries until the head answers). Without it, whoever runs them
    registers them with the head (`POST /stages/replicas`), as the cluster does.
    `drained` is the stage tiers' drain check (`ProcessSpec.drained`).
    """
    if len(stages) < 2:
        raise ValueError("a stage pipeline needs at least two stages")
    split = ",".join(s.layers for s in stages)
    base = [sys.executable, "-m", "strata.cli", "stage", "--threads", str(threads),
            "--dtype", dtype, "--device", device, "--log-level", "warning"]
    if model is not None:
        base += ["--model", model]

    def head_argv(host: str, port: int) -> list[str]:
        return [*base, "--layers", stages[0].layers, "--stages", split, "--host", host,
                "--port", str(port), *head_args]

    def stage_argv(layers: str) -> Callable[[str, int], list[str]]:
        def argv(host: str, port: int) -> list[str]:
            join = ["--join", head_url()] if head_url is not None else []
            return [*base, "--layers", layers, "--host", host, "--port", str(port),
                    "--data-port", "0", *join]

        return argv

    specs = {stage_tier_name(stages[0].layers): ProcessSpec(argv=head_argv, threads=threads)}
    for s in stages[1:]:
        specs[stage_tier_name(s.layers)] = ProcessSpec(argv=stage_argv(s.layers),
                                                       threads=threads, drained=drained)
    return specs


@dataclass(frozen=True)
class StageTier:
    """One platform tier of a pipeline: the head (named as the cluster file's tier) or a stage."""

    name: str
    layers: str
    head: bool
    min_replicas: int
    max_replicas: int
    initial_replicas: int

    @property
    def autoscaled(self) -> bool:
        """Its replica count may change (a later stage with max > min)."""
        return not self.head and self.max_replicas > self.min_replicas


def stage_tiers(tier: str, stages: Sequence[StageSpec]) -> list[StageTier]:
    """The pipeline's platform tiers, head first: `tier` (the head) and `stage-a-b` per later stage."""
    out = [StageTier(tier, stages[0].layers, True, 1, 1, 1)]
    for s in stages[1:]:
        lo, hi, initial = s.bounds
        out.append(StageTier(stage_tier_name(s.layers), s.layers, False, lo, hi, initial))
    return out


def resolve_stages(
    config: ClusterConfig, tier: str,
    measure: Callable[[], LayerCosts] | None = None,
) -> list[StageSpec]:
    """The concrete stages of a `kind: stages` tier, checked against the model's layer count.

    `stages: auto` splits by measured per-layer cost (`measure`, by default
    `strata.stages.profile.measure_layer_costs` on this machine with the tier's dtype).
    Raises ClusterConfigError naming the field.
    """
    from strata.engine.weights import load_config, resolve_model

    t = config.tiers[tier]
    assert t.kind == "stages" and t.stages is not None
    path = resolve_model(config.model_for(tier).path)
    num_layers = load_config(path).num_hidden_layers
    where = f"tiers.{tier}.stages"
    if t.stages == "auto":
        assert t.num_stages is not None
        if t.num_stages > num_layers:
            raise ClusterConfigError(f"tiers.{tier}.num_stages: {t.num_stages} stages need "
                                     f"at least as many layers; the model has {num_layers}")
        if measure is None:
            measure = _measurer(config, tier, path)
        cfg = StagesConfig(auto=t.num_stages, max_replicas=t.stage_max_replicas)
        return cfg.resolve(num_layers, measure())
    try:
        return StagesConfig(stages=list(t.stages)).resolve(num_layers)
    except ValueError as e:
        raise ClusterConfigError(f"{where}: {str(e).removeprefix('stages: ')}") from None


def _measurer(config: ClusterConfig, tier: str, path: object) -> Callable[[], LayerCosts]:
    def measure() -> LayerCosts:
        import torch

        from strata.engine.engine import pick_device
        from strata.stages.profile import measure_layer_costs

        opts = config.engine_for(tier)
        device = pick_device(opts.device)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(opts.dtype,
                                                                           torch.float32)
        return measure_layer_costs(path, dtype=dtype, device=device)  # type: ignore[arg-type]

    return measure


def cluster_stage_specs(
    config: ClusterConfig, tier: str, stages: Sequence[StageSpec],
    drained: Callable[[str], Awaitable[bool]] | None = None, cores: int | None = None,
) -> dict[str, ProcessSpec]:
    """Process specs of a pipeline tier: the head (keyed by `tier`) and every later stage.

    The head gets the engine options (KV size, batch limits, model name); threads default
    to the cores divided among the most processes the pipeline may run. `dtype: auto` is
    resolved once here (float32, or bfloat16 on CUDA), since every stage must use the same.
    """
    opts = config.engine_for(tier)
    tiers = stage_tiers(tier, stages)
    others = sum(t.max_replicas for n, t in config.tiers.items() if n != tier)  # engine tiers
    threads = opts.threads or threads_per_replica(cores or available_cores(),
                                                  sum(t.max_replicas for t in tiers) + others)
    dtype = opts.dtype
    if dtype == "auto":
        dtype = "bfloat16" if opts.device == "cuda" else "float32"
    head = opts.kv_and_batch_args()
    model = config.model_for(tier)
    if model.served_model_name is not None:
        head += ["--served-model-name", model.served_model_name]
    specs = stage_process_specs(stages, head_url=None, model=model.path, threads=threads,
                                dtype=dtype, device=opts.device, head_args=head, drained=drained)
    head_key = stage_tier_name(stages[0].layers)
    return {tier if name == head_key else name: spec for name, spec in specs.items()}
