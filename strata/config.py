"""The one cluster file: model, engine options, tiers, routing, autoscaling, SLOs, gateway.

Parsed once at start-up (``load_cluster_config``) and passed down explicitly. Every field
has a default, so ``strata serve`` without a file serves the bundled model with one
replica. Unknown keys fail, and every error names the field's path in the file and how to
fix it, e.g. ``tiers.engine.autoscaling.max_replicas: Field required; fix: add
max_replicas: <number>``.

A tier's ``autoscaling`` block is the autoscaler's own config model
(``strata.autoscale.registry.AutoscalingConfig``, a union keyed on ``policy``), so the
simulator and the cluster read the very same schema. The cluster-wide ``slos`` fill the
``ttft_slo_s``/``tpot_slo_s`` of the ``llm`` and ``predictive`` policies where the tier's
block leaves them unset.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from strata.autoscale.llm import LlmConfig
from strata.autoscale.registry import AutoscalingConfig, policy_names
from strata.routing.registry import DEFAULT_POLICY, make_policy
from strata.routing.registry import policy_names as routing_policy_names

_TIER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ClusterConfigError(ValueError):
    """The cluster file is invalid; the message lists every problem with its fix."""


class _Strict(BaseModel):
    """Base of the cluster file's sections: unknown keys fail, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_bytes(value: int | str) -> int:
    """``"512MiB"``, ``"1G"``, ``"65536"`` or an int -> bytes (binary units)."""
    if isinstance(value, int):
        return value
    m = _BYTES.match(str(value))
    if m is None:
        raise ValueError(f"{value!r} is not a size; write e.g. 256MiB, 1GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class ModelConfig(_Strict):
    """Which weights every engine replica serves."""

    path: str | None = None  # a .gguf file or Hugging Face directory; None: the bundled model
    served_model_name: str | None = None  # the name clients send; default: the file's


class EngineOptions(_Strict):
    """Options of each engine replica (``strata engine`` flags)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1)  # None: cores divided among max replicas
    kv_cache: int | str = "1GiB"
    num_kv_blocks: int | None = Field(default=None, ge=1)
    block_size: int = Field(default=16, ge=1)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=512, ge=1)
    max_model_len: int | None = Field(default=None, ge=16)
    prefix_caching: bool = True

    @field_validator("kv_cache")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        if parse_bytes(v) < 1 << 20:
            raise ValueError(f"kv_cache {v!r} is below 1MiB; write e.g. 256MiB or 1GiB")
        return v

    @property
    def kv_cache_bytes(self) -> int:
        """The KV cache size in bytes."""
        return parse_bytes(self.kv_cache)


class TierConfig(_Strict):
    """One tier: a set of interchangeable replicas, scaled as one."""

    kind: Literal["engine"] = "engine"  # layer-range stage tiers come later
    replicas: int = Field(default=1, ge=0)  # fixed count, or the initial one when autoscaled
    engine: EngineOptions | None = None  # None: the cluster-wide ``engine`` section
    autoscaling: AutoscalingConfig | None = None  # None: keep ``replicas`` fixed
    custom_metrics: dict[str, str] = Field(default_factory=dict)  # custom_<name>: PromQL

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
        """The fewest replicas the tier may run."""
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
    read_timeout_s: float = Field(default=300.0, gt=0)
    max_retries: int = Field(default=2, ge=0)
    poll_interval_s: float = Field(default=0.2, gt=0)
    health_interval_s: float = Field(default=1.0, gt=0)
    eject_after_failures: int = Field(default=3, ge=1)


class PlatformOptions(_Strict):
    """Where replicas live: local processes on loopback for now."""

    kind: Literal["local"] = "local"
    start_timeout_s: float = Field(default=300.0, gt=0)  # not ready by then: killed, restarted
    restart_backoff_s: float = Field(default=1.0, gt=0)  # first restart delay, then doubled
    restart_backoff_max_s: float = Field(default=60.0, gt=0)
    stable_after_s: float = Field(default=60.0, gt=0)  # ready this long: backoff resets
    drain_timeout_s: float = Field(default=120.0, ge=0)  # in-flight requests get this long
    stop_timeout_s: float = Field(default=10.0, gt=0)  # SIGTERM -> SIGKILL
    health_interval_s: float = Field(default=0.5, gt=0)
    log_dir: Path | None = None  # replica logs; None: a fresh temporary directory


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
    def _model_shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v  # ``model: path/to/file.gguf``

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if len(self.tiers) != 1:
            raise ValueError(f"tiers: exactly one engine tier is supported for now (stage "
                             f"tiers come later); got {len(self.tiers)}: {', '.join(self.tiers)}")
        for name, tier in self.tiers.items():
            if not _TIER_NAME.match(name):
                raise ValueError(f"tiers: name {name!r} must be lowercase letters, digits and "
                                 "'-' (at most 32), like 'engine'")
            if tier.custom_metrics and self.prometheus.url is None:
                raise ValueError(f"tiers.{name}.custom_metrics are PromQL queries: set "
                                 "prometheus.url (e.g. http://127.0.0.1:9090)")
            if tier.max_replicas < 1 and tier.autoscaling is not None:
                raise ValueError(f"tiers.{name}.autoscaling.max_replicas must be >= 1")
        return self

    @property
    def tier_name(self) -> str:
        """The (single) tier's name."""
        return next(iter(self.tiers))

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
