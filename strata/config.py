"""The one cluster file: model, engine options, tiers, routing, autoscaling, SLOs, gateway.

Parsed once at start-up (``load_cluster_config``) and passed down explicitly. Every field
has a default, so ``strata serve`` without a file serves the bundled model with one
replica. Unknown keys fail, and every error names the field's path in the file and how to
fix it, e.g. ``tiers.engine.autoscaling.max_replicas: Field required; fix: add
max_replicas: <number>``.

The ``engine`` section is ``strata.engine.options.EngineOptions``, the same model the
``strata engine`` flags are generated from. A tier's ``autoscaling`` block is the autoscaler's own config model
(``strata.autoscale.registry.AutoscalingConfig``, a union keyed on ``policy``), so the
simulator and the cluster read the very same schema. The cluster-wide ``slos`` fill the
``ttft_slo_s``/``tpot_slo_s`` of the ``llm`` and ``predictive`` policies where the tier's
block leaves them unset.

Several tiers may serve several models: a tier's own ``model`` (else the top-level one)
and ``engine`` (else the top-level one). The gateway routes a request to the tier whose
served name is its ``model``, so the names must differ across tiers.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from strata.autoscale.llm import LlmConfig
from strata.autoscale.registry import AutoscalingConfig, policy_names
from strata.engine.options import EngineOptions
from strata.routing.registry import DEFAULT_POLICY, make_policy
from strata.routing.registry import policy_names as routing_policy_names
from strata.stages.plan import StageSpec

_TIER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


class ClusterConfigError(ValueError):
    """The cluster file is invalid; the message lists every problem with its fix."""


class _Strict(BaseModel):
    """Base of the cluster file's sections: unknown keys fail, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which weights a tier's engine replicas serve."""

    path: str | None = None  # a .gguf file or Hugging Face directory; None: the bundled model
    served_model_name: str | None = None  # the name clients send; default: the file's


def _model_shorthand(v: Any) -> Any:
    return {"path": v} if isinstance(v, str) else v  # ``model: path/to/file.gguf``


def _stages_kind(value: Any) -> str:
    return "auto[str]" if isinstance(value, str) else "ranges[list]"


# A list of layer ranges or the word ``auto``; the tag picks one, so an error is about it only.
_Stages = Annotated[
    Annotated[list[StageSpec], Tag("ranges[list]")] | Annotated[Literal["auto"], Tag("auto[str]")],
    Discriminator(_stages_kind),
]


class StageScaling(_Strict):
    """How every later stage of a pipeline scales, each within its own min/max replicas.

    HPA on the stage replicas' busy ratio (``custom_stage_busy``); only the bottleneck stage
    (the busiest) may grow in one tick.
    """

    target_busy_pct: int = Field(default=80, ge=1, le=100)  # busy fraction each replica aims at
    downscale_stabilization_s: int = Field(default=300, ge=0)  # Kubernetes' default window


class TierConfig(_Strict):
    """One tier: a set of interchangeable replicas, scaled as one.

    ``kind: stages`` (implied by ``stages``) is a layer-range pipeline: a head process
    (scheduler, OpenAI API, the first layer range) that the gateway sees as the model's
    replica, and one replica set per later range, each scaled on its own.
    """

    kind: Literal["engine", "stages"] = "engine"
    model: ModelConfig | None = None  # None: the cluster-wide ``model`` section
    replicas: int = Field(default=1, ge=0)  # fixed count, or the initial one when autoscaled
    engine: EngineOptions | None = None  # None: the cluster-wide ``engine`` section
    autoscaling: AutoscalingConfig | None = None  # None: keep ``replicas`` fixed
    custom_metrics: dict[str, str] = Field(default_factory=dict)  # custom_<name>: PromQL
    # kind stages: explicit layer ranges, or ``auto`` (split balanced by measured cost)
    stages: _Stages | None = None
    num_stages: int | None = Field(default=None, ge=2)  # with ``stages: auto``
    stage_max_replicas: int = Field(default=1, ge=1)  # with ``stages: auto``: each later stage
    stage_scaling: StageScaling = Field(default_factory=StageScaling)

    @field_validator("model", mode="before")
    @classmethod
    def _model_path(cls, v: Any) -> Any:
        return _model_shorthand(v)

    @model_validator(mode="before")
    @classmethod
    def _implied_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("stages") is not None and "kind" not in data:
            return {**data, "kind": "stages"}
        return data

    @model_validator(mode="after")
    def _stages(self) -> TierConfig:
        if self.kind == "engine":
            if self.stages is not None or self.num_stages is not None:
                raise ValueError("stages / num_stages belong to a stage pipeline: set kind: "
                                 "stages (or remove kind)")
            return self
        if self.stages is None:
            raise ValueError("stages: a kind: stages tier needs `stages`: a list of layer "
                             "ranges ([{layers: '0:15'}, {layers: '15:30'}]) or `auto`")
        if self.autoscaling is not None:
            raise ValueError("autoscaling: a stage pipeline scales each later stage within its "
                             "own min_replicas/max_replicas (see stage_scaling); remove "
                             "autoscaling")
        if self.replicas != 1:
            raise ValueError(f"replicas: a stage pipeline runs one head (got {self.replicas}); "
                             "replicate later stages with their max_replicas")
        if self.custom_metrics:
            raise ValueError("custom_metrics: stage pipelines scale on their busy ratio only")
        if self.stages == "auto":
            if self.num_stages is None:
                raise ValueError("num_stages: `stages: auto` needs the number of stages, e.g. "
                                 "num_stages: 2")
            return self
        if self.num_stages is not None:
            raise ValueError("num_stages goes with `stages: auto`; explicit stages already "
                             "say how many")
        if len(self.stages) < 2:
            raise ValueError("stages: a pipeline needs at least two layer ranges, e.g. "
                             "[{layers: '0:15'}, {layers: '15:30'}]")
        head = self.stages[0]
        if head.range[0] != 0:
            raise ValueError(f"stages[0].layers: the first stage must start at layer 0, not "
                             f"{head.layers}")
        if head.bounds[:2] != (1, 1):
            raise ValueError("stages[0]: the head (scheduler, OpenAI API) runs one replica; "
                             "remove its replicas/min_replicas/max_replicas")
        for i, (prev, cur) in enumerate(zip(self.stages, self.stages[1:], strict=False), 1):
            if cur.range[0] != prev.range[1]:
                raise ValueError(f"stages[{i}].layers: {cur.layers} must start where "
                                 f"stages[{i - 1}] ({prev.layers}) ends, at layer "
                                 f"{prev.range[1]}")
        return self

    @field_validator("custom_metrics")
    @classmethod
    def _custom(cls, v: dict[str, str]) -> dict[str, str]:
        for name, query in v.items():
            if not name.startswith("custom_"):
                raise ValueError(f"custom metric {name!r} must be named custom_<something> "
                                 "so autoscaling metrics can refer to it")
            if not query.strip():
                raise ValueError(f"custom metric {name!r} needs a PromQL query")
        return v

    @property
    def min_replicas(self) -> int:
        """The fewest replicas the tier may run (a stage pipeline: of its head)."""
        return self.replicas if self.autoscaling is None else self.autoscaling.min_replicas

    @property
    def max_replicas(self) -> int:
        """The most replicas the tier may run (KPA without a bound: ``replicas`` or 1)."""
        if self.autoscaling is None:
            return self.replicas
        bound = self.autoscaling.max_replicas
        return bound if bound is not None else max(self.replicas, self.min_replicas, 1)

    @property
    def initial_replicas(self) -> int:
        """Replicas started with the cluster: ``replicas`` clamped into [min, max]."""
        return min(max(self.replicas, self.min_replicas), self.max_replicas)


class RoutingConfig(_Strict):
    """The gateway's routing policy (``strata.routing.registry``) and its parameters."""

    policy: str = DEFAULT_POLICY
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> RoutingConfig:
        if self.policy not in routing_policy_names():
            raise ValueError(f"policy {self.policy!r} is unknown; use one of "
                             f"{', '.join(routing_policy_names())}")
        make_policy(self.policy, **self.params)  # bad params fail here, not at first request
        return self


class SloConfig(_Strict):
    """Latency objectives: what ``llm``/``predictive`` scale for and ``status`` reports."""

    ttft_s: float | None = Field(default=2.0, gt=0)
    tpot_s: float | None = Field(default=0.2, gt=0)
    percentile: float = Field(default=90.0, gt=0, le=100)


class GatewayOptions(_Strict):
    """The OpenAI-compatible front door."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys_file: Path | None = None  # see strata.gateway.auth for the format
    rate_limit_rpm: int = Field(default=0, ge=0)  # per key (per address without keys); 0: off
    rate_limit_tpm: int = Field(default=0, ge=0)
    max_body_bytes: int = Field(default=8 << 20, ge=1024)
    max_in_flight_per_model: int | None = Field(default=None, ge=1)
    max_queued_per_model: int = Field(default=1024, ge=0)
    queue_timeout_s: float = Field(default=30.0, ge=0)
    hold_timeout_s: float = Field(default=60.0, ge=0)  # wait for a replica (scale from zero)
    connect_timeout_s: float = Field(default=3.0, gt=0)
    # Silence after which a replica's probes decide; a request fails only if they fail too.
    read_timeout_s: float = Field(default=300.0, gt=0)
    request_timeout_s: float | None = Field(default=None, gt=0)  # hard cap; None: none
    max_retries: int = Field(default=2, ge=0)
    poll_interval_s: float = Field(default=0.2, gt=0)
    health_interval_s: float = Field(default=1.0, gt=0)
    eject_after_failures: int = Field(default=3, ge=1)
    # Gateway pods on Kubernetes, active-active behind one Service (they agree on routing:
    # load and prefix-cache contents come from the engines' own reports). `strata serve`
    # runs one gateway in its own process.
    replicas: int = Field(default=2, ge=1, le=64)


class PlatformOptions(_Strict):
    """Where replicas live: local processes on loopback, or a Kubernetes Deployment per tier.

    The ``kubernetes`` kind scales each tier's Deployment through its scale subresource,
    reads ready replicas from the EndpointSlices of the tier's Service and drains a pod
    before a scale-down removes it (``strata.platform.kubernetes``).
    """

    kind: Literal["local", "kubernetes"] = "local"
    start_timeout_s: float = Field(default=300.0, gt=0)  # not ready by then: killed, restarted
    restart_backoff_s: float = Field(default=1.0, gt=0)  # first restart delay, then doubled
    restart_backoff_max_s: float = Field(default=60.0, gt=0)
    stable_after_s: float = Field(default=60.0, gt=0)  # ready this long: backoff resets
    drain_timeout_s: float = Field(default=120.0, ge=0)  # in-flight requests get this long
    stop_timeout_s: float = Field(default=10.0, gt=0)  # SIGTERM -> SIGKILL
    health_interval_s: float = Field(default=0.5, gt=0)
    log_dir: Path | None = None  # replica logs; None: a fresh temporary directory
    # -- kind: kubernetes ------------------------------------------------------------------
    namespace: str = "default"
    # in-cluster: the pod's service account; kubeconfig: ``kubeconfig`` (None: $KUBECONFIG
    # or ~/.kube/config) and its ``kube_context``
    kube_auth: Literal["in-cluster", "kubeconfig"] = "in-cluster"
    kubeconfig: Path | None = None
    kube_context: str | None = None
    api_server: str | None = None  # overrides the API server URL, e.g. `kubectl proxy`'s
    deployment_name: str = "strata-{tier}"  # each tier's Deployment; {tier} is replaced
    service_name: str = "strata-{tier}"  # the Service whose EndpointSlices list the tier
    label_selector: str = ""  # extra selector ANDed onto the EndpointSlice watch
    port_name: str = "http"  # the EndpointSlice port the replicas serve on
    capacity_resource: str = "cpu"  # the pod request that weights utilization (hpa)
    api_timeout_s: float = Field(default=10.0, gt=0)  # one API request
    api_backoff_s: float = Field(default=0.5, gt=0)  # retry delay after an API error, doubled
    api_backoff_max_s: float = Field(default=30.0, gt=0)
    watch_timeout_s: int = Field(default=300, ge=1)  # a watch is renewed after this long

    @field_validator("deployment_name", "service_name")
    @classmethod
    def _tier_pattern(cls, v: str) -> str:
        if "{tier}" not in v:
            raise ValueError(f"{v!r} must contain {{tier}} (e.g. strata-{{tier}}), so each "
                             "tier gets its own object")
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", v):
            raise ValueError(f"namespace {v!r} is not a DNS label (lowercase letters, digits, "
                             "'-', at most 63 characters)")
        return v


class PrometheusOptions(_Strict):
    """An optional Prometheus server the autoscaler queries instead of scraping itself."""

    url: str | None = None  # e.g. http://127.0.0.1:9090; None: scrape /metrics directly
    targets_file: Path | None = None  # file_sd JSON the cluster keeps current for Prometheus
    query_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"prometheus.url {v!r} must look like http://host:9090")
        return v.rstrip("/") if v else v


class AutoscalerOptions(_Strict):
    """The control loop: how often it runs and over which window it measures rates."""

    period_s: float = Field(default=15.0, ge=1.0)
    window_s: float = Field(default=60.0, ge=1.0)  # arrival rates, TTFT/TPOT observations
    decision_log: Path | None = None  # JSON lines of every decision; None: log only
    history: int = Field(default=50, ge=1)  # decisions kept for ``strata status``


class ClusterConfig(_Strict):
    """The whole cluster file; ``ClusterConfig()`` is a valid one-replica cluster."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineOptions = Field(default_factory=EngineOptions)
    tiers: dict[str, TierConfig] = Field(default_factory=lambda: {"engine": TierConfig()})
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    autoscaler: AutoscalerOptions = Field(default_factory=AutoscalerOptions)
    slos: SloConfig = Field(default_factory=SloConfig)
    gateway: GatewayOptions = Field(default_factory=GatewayOptions)
    platform: PlatformOptions = Field(default_factory=PlatformOptions)
    prometheus: PrometheusOptions = Field(default_factory=PrometheusOptions)

    @field_validator("model", mode="before")
    @classmethod
    def _model_path(cls, v: Any) -> Any:
        return _model_shorthand(v)

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if not self.tiers:
            raise ValueError("tiers: give at least one tier, e.g. tiers: {engine: {}}")
        pipelines = [n for n, t in self.tiers.items() if t.kind == "stages"]
        if len(pipelines) > 1:
            raise ValueError(f"tiers: one stage pipeline per cluster (its stage tiers are "
                             f"named by layer range); got {', '.join(pipelines)}: make the "
                             "others engine tiers")
        clash = [n for n in self.tiers if pipelines and n.startswith("stage-")]
        if clash:
            raise ValueError(f"tiers.{clash[0]}: names stage-... are the pipeline's own stage "
                             "tiers; rename this tier")
        for name, tier in self.tiers.items():
            if not _TIER_NAME.match(name):
                raise ValueError(f"tiers: name {name!r} must be lowercase letters, digits and "
                                 "'-' (at most 32), like 'engine'")
            if tier.custom_metrics and self.prometheus.url is None:
                raise ValueError(f"tiers.{name}.custom_metrics are PromQL queries: set "
                                 "prometheus.url (e.g. http://127.0.0.1:9090)")
            if tier.max_replicas < 1 and tier.autoscaling is not None:
                raise ValueError(f"tiers.{name}.autoscaling.max_replicas must be >= 1")
            if tier.kind == "stages" and self.engine_for(name).dtype == "int8":
                raise ValueError(f"tiers.{name}: stage pipelines run float32, bfloat16 or "
                                 "float16 (int8 weights are engine-only); set engine.dtype")
            if tier.kind == "stages" and self.engine_for(name).kv_cache_dtype != "auto":
                raise ValueError(f"tiers.{name}: stage pipelines keep their KV cache in the "
                                 "model's dtype; remove engine.kv_cache_dtype")
        served: dict[str, str] = {}
        for name in self.tiers:
            model = served_model_name(self.model_for(name))
            if model in served:
                raise ValueError(
                    f"tiers.{served[model]} and tiers.{name} both serve model {model!r}, but "
                    f"the gateway routes by model name; give one of them its own name, e.g. "
                    f"tiers.{name}.model.served_model_name: {model}-{name}")
            served[model] = name
        return self

    @property
    def default_tier(self) -> str:
        """The first tier: a request without a ``model`` goes there."""
        return next(iter(self.tiers))

    @property
    def pipeline_tier(self) -> str | None:
        """The stage pipeline tier's name, if the cluster has one (at most one)."""
        return next((n for n, t in self.tiers.items() if t.kind == "stages"), None)

    def model_for(self, tier: str) -> ModelConfig:
        """The model of ``tier``: its own section, else the cluster-wide one."""
        return self.tiers[tier].model or self.model

    def served_model(self, tier: str) -> str:
        """The name clients send for ``tier``'s model (known before any replica starts)."""
        return served_model_name(self.model_for(tier))

    def served_models(self) -> dict[str, str]:
        """Served model name -> tier, in the file's order."""
        return {self.served_model(t): t for t in self.tiers}

    def engine_for(self, tier: str) -> EngineOptions:
        """The engine options of ``tier``: its own section, else the cluster-wide one."""
        return self.tiers[tier].engine or self.engine

    def autoscaling_for(self, tier: str) -> Any:
        """The tier's autoscaling config with the cluster SLOs filled in; None if fixed."""
        cfg = self.tiers[tier].autoscaling
        if not isinstance(cfg, LlmConfig):  # None, hpa, kpa: no SLO fields
            return cfg
        update: dict[str, Any] = {}
        if "ttft_slo_s" not in cfg.model_fields_set and self.slos.ttft_s is not None:
            update["ttft_slo_s"] = self.slos.ttft_s
        if "tpot_slo_s" not in cfg.model_fields_set and self.slos.tpot_s is not None:
            update["tpot_slo_s"] = self.slos.tpot_s
        if "slo_percentile" not in cfg.model_fields_set:
            update["slo_percentile"] = self.slos.percentile
        return cfg.model_copy(update=update) if update else cfg


# The bundled model (strata.engine.weights.BUNDLED_MEMBER) as the engine names it.
_BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
_BUNDLED_ALIASES = ("smollm2-135m", "bundled")
# strata.engine.weights.GEMMA3_270M_ALIASES -> its GGUF's name as the engine reports it.
_NAMED_MODELS = {"gemma3-270m": "gemma-3-270m"}


def served_model_name(model: ModelConfig) -> str:
    """The model id engines of ``model`` will report, known before any of them starts.

    The rule of ``strata.engine.engine.default_model_name``, applied to the configured path
    without loading anything (that module needs torch, which the gateway does not).
    """
    if model.served_model_name:
        return model.served_model_name
    if model.path is None or model.path.lower() in _BUNDLED_ALIASES:
        return _BUNDLED_MODEL_NAME
    if model.path.lower() in _NAMED_MODELS:
        return _NAMED_MODELS[model.path.lower()]
    path = Path(model.path).expanduser()
    stem = path.stem if path.suffix == ".gguf" else path.name
    return re.sub(r"[.-](Q\d\w*|IQ\d\w*|F16|F32|BF16)$", "", stem, flags=re.IGNORECASE)


# -- loading and errors ------------------------------------------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (through Optional, unions, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()) or ():
        out += _models_in(arg)
    meta = getattr(annotation, "__origin__", None)
    if meta is not None and not out and getattr(annotation, "__metadata__", None):
        out += _models_in(meta)
    return out


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys accepted where ``loc`` points (for "did you mean"); [] when unknown."""
    models: list[type[BaseModel]] = [ClusterConfig]
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        if isinstance(part, int):  # a list index (stages[i]): same models
            continue
        nxt: list[type[BaseModel]] = []
        for m in models:
            field = m.model_fields.get(str(part))
            if field is None:
                continue
            ann = field.annotation
            if getattr(ann, "__origin__", None) is dict:
                if parts:
                    parts.pop(0)  # the dict key (a tier name)
                ann = ann.__args__[1]  # type: ignore[union-attr]
            nxt += _models_in(ann)
        models = nxt
    return sorted({name for m in models for name in m.model_fields})


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's union tags (``autoscaling.hpa.max_replicas`` -> ``autoscaling.max_replicas``)."""
    out: list[Any] = []
    for i, part in enumerate(loc):
        if i > 0 and loc[i - 1] == "autoscaling" and part in policy_names():
            continue
        if isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        out.append(part)
    return tuple(out)


def _fix(err: dict[str, Any], loc: tuple[Any, ...]) -> str:
    """A short instruction that repairs one validation error."""
    kind = err["type"]
    name = str(loc[-1]) if loc else ""
    if kind == "missing":
        return f"add {name}: <value>"
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(name, _fields_at(loc), n=1)
        return f"did you mean {close[0]!r}?" if close else f"remove {name!r}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return f"set policy to one of {', '.join(policy_names())}"
    if kind == "literal_error":
        return "use one of the values listed"
    if kind == "too_short":
        return "give at least one entry"
    if kind.startswith(("greater", "less")):
        return "change the value to satisfy the bound"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return "write a value of the expected type"
    return "see deploy/cluster.example.yaml"


def format_errors(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: field.path: message; fix: ...``."""
    lines = []
    for e in err.errors(include_url=False):
        loc = _clean_loc(tuple(e["loc"]))
        where = ".".join(str(p) for p in loc) or "<top level>"
        if e["type"] == "value_error":  # strata's own checks already say how to fix them
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {msg}" if not loc else f"{source}: {where}: {msg}")
        else:
            lines.append(f"{source}: {where}: {e['msg']}; fix: {_fix(e, loc)}")
    return "\n".join(lines)


def parse_cluster_config(data: Any, source: str = "cluster file") -> ClusterConfig:
    """Validate an already-parsed YAML document (None or {} means all defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{source}: the top level must be a mapping of sections "
                                 f"(model, engine, tiers, ...), got {type(data).__name__}")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as err:
        raise ClusterConfigError(format_errors(err, source)) from None


def load_cluster_config(path: Path | None) -> ClusterConfig:
    """Read and validate a cluster file; ``None`` gives the all-defaults cluster."""
    if path is None:
        return ClusterConfig()
    try:
        text = path.read_text()
    except OSError as err:
        raise ClusterConfigError(f"{path}: cannot read the cluster file: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ClusterConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_cluster_config(data, str(path))
