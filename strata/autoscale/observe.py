"""The autoscaler's eyes: a tier's replicas, their /load, and the tier's windowed signals.

Per-replica facts come from the platform (phase, start and ready times) and each replica's
``GET /load`` (the one load report). Tier-level signals (arrival rate, tokens per request,
requests held by the activator, TTFT/TPOT observations) come from one of two sources:

* ``ScrapeSource``: scrapes the gateway's and every replica's ``/metrics`` itself each tick
  and keeps the windows (``strata.autoscale.signals``);
* ``PrometheusSource``: asks a Prometheus server over its HTTP API (``/api/v1/query``),
  which computes the same windows with ``rate``/``increase``, and evaluates the tier's
  ``custom_metrics`` PromQL queries for ``custom_*`` autoscaling metrics.

Series names: the gateway exports ``strata_cluster_requests_received_total`` (arrivals,
from the cluster's front), ``strata_gateway_queue_depth``,
``strata_gateway_requests_in_flight`` and ``strata_gateway_ttft_seconds``; engines export
``strata_prompt_tokens_total``, ``strata_generation_tokens_total``,
``strata_requests_total`` and ``strata_time_per_output_token_seconds``. Prometheus targets
carry a ``tier`` label (the cluster writes them to a file_sd file).

Everything read here comes from other processes and is untrusted. A replica whose /load
or /metrics is unreachable, slow, not JSON, not a LoadReport, or carries a NaN, an
infinity or a negative count is left out of this tick (its report is ``None``: a missing
metric, as Kubernetes' HPA treats one); a tier-level signal that is unreadable or not a
finite non-negative number raises ``ObservationError`` and the loop skips the tier's
tick. Each drop is logged when its reason changes and counted in
``strata_autoscaler_dropped_samples``. Per-replica and per-tier state here is keyed by
what is present now and dropped with it, so replica churn cannot grow it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import httpx
from prometheus_client import CollectorRegistry, Counter

from strata.autoscale.signals import (
    CounterWindow,
    HistogramWindow,
    Sample,
    buckets,
    histogram_observations,
    parse_samples,
    total,
)
from strata.autoscale.types import ReplicaSample, TierState
from strata.load import LoadReport
from strata.platform.base import Platform, Replica

ARRIVALS = "strata_cluster_requests_received_total"
QUEUE_DEPTH = "strata_gateway_queue_depth"
IN_FLIGHT = "strata_gateway_requests_in_flight"
GATEWAY_TTFT = "strata_gateway_ttft_seconds_bucket"
PROMPT_TOKENS = "strata_prompt_tokens_total"
GENERATION_TOKENS = "strata_generation_tokens_total"
FINISHED = "strata_requests_total"
ENGINE_TPOT = "strata_time_per_output_token_seconds_bucket"
GATEWAY_SERIES = (ARRIVALS, QUEUE_DEPTH, IN_FLIGHT, GATEWAY_TTFT)
ENGINE_SERIES = (PROMPT_TOKENS, GENERATION_TOKENS, FINISHED, ENGINE_TPOT)

# A histogram page with more distinct bucket bounds than this is garbage: each bound keeps
# a window, so an unbounded set would grow the autoscaler's memory without limit.
MAX_BUCKET_BOUNDS = 64
_MAX_NAMES = 4096  # a /load list of names (adapters) longer than this is garbage
DEFAULT_TIMEOUT_S = 5.0  # one /load, /metrics or Prometheus answer, body included

log = logging.getLogger("strata.autoscaler")


class ObservationError(Exception):
    """A tier's signals could not be read this tick (the decision is skipped)."""


def _finite(value: float, what: str, *, negative_ok: bool = False) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, not a finite number")
    if value < 0 and not negative_ok:
        raise ValueError(f"{what} is {value!r}, below zero")
    return float(value)


def parse_load_report(data: Any) -> LoadReport:
    """A /load body as a LoadReport, or ValueError saying what is wrong with it.

    Every field the report defines must be present with its type; counts are
    non-negative integers, rates finite and non-negative, and at most all KV blocks free.
    """
    if not isinstance(data, dict):
        raise ValueError(f"/load body is a {type(data).__name__}, not a JSON object")
    values: dict[str, Any] = {}
    for f in fields(LoadReport):
        if f.name not in data:
            if f.name in ("ready", "draining", "stage", "lora_adapters"):
                continue  # defaulted fields an older replica may not send
            raise ValueError(f"/load lacks {f.name!r}")
        v = data[f.name]
        if f.type == "str":
            ok = isinstance(v, str)
        elif f.type == "bool":
            ok = isinstance(v, bool)
        elif f.type == "int":
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
        elif f.type == "tuple[str, ...]":  # names (LoRA adapters): a bounded JSON list
            ok = isinstance(v, list | tuple) and len(v) <= _MAX_NAMES \
                and all(isinstance(x, str) for x in v)
            v = tuple(v) if ok else v
        else:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) \
                and v >= 0
        if not ok:
            raise ValueError(f"/load field {f.name!r} is {v!r}, not a valid {f.type}")
        values[f.name] = v
    if values["free_kv_blocks"] > values["total_kv_blocks"]:
        raise ValueError("/load says more KV blocks free than it has")
    if values["prefix_hit_rate"] > 1:
        raise ValueError(f"/load prefix_hit_rate {values['prefix_hit_rate']!r} is above 1")
    return LoadReport(**values)


def check_signals(s: TierSignals) -> TierSignals:
    """``s`` if every number in it is finite (and non-negative, custom metrics aside)."""
    try:
        for name in ("arrival_rate_rps", "mean_prompt_tokens", "mean_output_tokens",
                     "pending_requests", "arrivals_total"):
            _finite(getattr(s, name), name)
        if s.in_flight_requests is not None:
            _finite(s.in_flight_requests, "in_flight_requests")
        for name in ("ttft_s", "tpot_s"):
            for v in getattr(s, name):
                _finite(v, name)
        for name, v in s.extra.items():
            _finite(v, f"custom metric {name}", negative_ok=True)
    except ValueError as err:
        raise ObservationError(f"tier signal unusable: {err}") from err
    return s


def _page_ok(samples: list[Sample], names: tuple[str, ...]) -> list[Sample]:
    """``samples`` if the series the autoscaler reads from them are sane, else ValueError."""
    bounds: set[str] = set()
    for smp in samples:
        if smp.name in names:
            _finite(smp.value, smp.name)
            if "le" in smp.labels:
                bounds.add(smp.labels["le"])
                float(smp.labels["le"])
    if len(bounds) > MAX_BUCKET_BOUNDS:
        raise ValueError(f"{len(bounds)} histogram bucket bounds (at most {MAX_BUCKET_BOUNDS})")
    return samples


@dataclass(frozen=True, slots=True)
class TierSignals:
    """Tier-level facts over the recent window, from either source."""

    arrival_rate_rps: float = 0.0
    mean_prompt_tokens: float = 0.0
    mean_output_tokens: float = 0.0
    pending_requests: int = 0
    in_flight_requests: int | None = None
    arrivals_total: float = 0.0  # a running count, to tell when the last request came
    ttft_s: tuple[float, ...] = ()
    tpot_s: tuple[float, ...] = ()
    extra: Mapping[str, float] = field(default_factory=dict)


class SignalSource(Protocol):
    """Where tier-level signals come from."""

    name: str

    async def signals(self, tier: str, replicas: list[Replica], now: float) -> TierSignals:
        """The tier's signals now; ObservationError when they cannot be read."""
        ...


def _per_request(tokens: float, requests: float) -> float:
    return tokens / requests if requests > 0 else 0.0


class ScrapeSource:
    """Reads ``/metrics`` of the gateway and of every replica directly, each tick."""

    name = "metrics"

    def __init__(self, gateway_metrics: Callable[[], Awaitable[str]], http: httpx.AsyncClient,
                 window_s: float, timeout_s: float = DEFAULT_TIMEOUT_S,
                 models: Mapping[str, Collection[str]] | None = None) -> None:
        """``gateway_metrics`` returns the gateway's /metrics text (in-process or HTTP).

        ``models``: tier -> the model names it serves, so that the gateway's per-model
        series (queue, TTFT) count toward their own tier when it fronts several.
        """
        self.gateway_metrics = gateway_metrics
        self.models = models or {}
        self.http = http
        self.window_s = window_s
        self.timeout_s = timeout_s
        self._dropped: dict[str, str] = {}  # replica url -> why its last page was dropped
        self._windows: dict[str, dict[str, CounterWindow]] = {}
        self._hists: dict[str, dict[str, HistogramWindow]] = {}

    def _counter(self, tier: str, name: str) -> CounterWindow:
        return self._windows.setdefault(tier, {}).setdefault(name, CounterWindow(self.window_s))

    def _hist(self, tier: str, name: str) -> HistogramWindow:
        return self._hists.setdefault(tier, {}).setdefault(name, HistogramWindow(self.window_s))

    async def _get_page(self, url: str) -> list[Sample]:
        resp = await asyncio.wait_for(self.http.get(url + "/metrics"), self.timeout_s)
        if resp.status_code != 200:
            raise ValueError(f"HTTP {resp.status_code}")
        return _page_ok(parse_samples(resp.text), ENGINE_SERIES)

    async def _scrape(self, url: str) -> list[Sample] | None:
        try:
            page = await self._get_page(url)
        except Exception as err:  # noqa: BLE001 - any failure of an untrusted page drops it
            # A replica going away mid-scrape, or answering garbage: its counters leave
            # the sum (a later good page counts as a restart), and the tick goes on.
            why = f"{type(err).__name__}: {err}"
            if self._dropped.get(url) != why:
                log.warning("replica %s /metrics dropped this tick: %s", url, why)
            self._dropped[url] = why
            return None
        self._dropped.pop(url, None)
        return page

    async def signals(self, tier: str, replicas: list[Replica], now: float) -> TierSignals:
        """Scrape, fold into the windows, and read the windows."""
        try:
            text = await asyncio.wait_for(self.gateway_metrics(), self.timeout_s)
            gw = _page_ok(parse_samples(text), GATEWAY_SERIES)
        except Exception as err:  # noqa: BLE001 - the page is untrusted text
            raise ObservationError(f"gateway /metrics unreadable: "
                                   f"{type(err).__name__}: {err}") from err
        urls = [r.url for r in replicas if r.url is not None]
        for gone in set(self._dropped) - set(urls):
            del self._dropped[gone]
        pages = await asyncio.gather(*(self._scrape(u) for u in urls))
        engines = {u: p for u, p in zip(urls, pages, strict=True) if p is not None}

        arrivals = self._counter(tier, ARRIVALS)
        arrivals.update(now, {"gateway": total(gw, ARRIVALS, tier=tier) or 0.0})
        for name in (PROMPT_TOKENS, GENERATION_TOKENS, FINISHED):
            self._counter(tier, name).update(now, {u: total(p, name) or 0.0
                                                   for u, p in engines.items()})
        models = self.models.get(tier)
        if models is not None:  # the gateway's per-model series of this tier only
            gw = [s for s in gw if s.name not in (QUEUE_DEPTH, GATEWAY_TTFT)
                  or s.labels.get("model") in models]
        ttft = self._hist(tier, GATEWAY_TTFT)
        ttft.update(now, {"gateway": buckets(gw, GATEWAY_TTFT)})
        tpot = self._hist(tier, ENGINE_TPOT)
        tpot.update(now, {u: buckets(p, ENGINE_TPOT) for u, p in engines.items()})

        finished = self._counter(tier, FINISHED).increase()
        in_flight = total(gw, IN_FLIGHT, tier=tier)
        if in_flight is None:
            in_flight = total(gw, IN_FLIGHT)  # a gateway whose gauge has no tier label
        return check_signals(TierSignals(
            arrival_rate_rps=arrivals.rate(),
            mean_prompt_tokens=_per_request(self._counter(tier, PROMPT_TOKENS).increase(),
                                            finished),
            mean_output_tokens=_per_request(self._counter(tier, GENERATION_TOKENS).increase(),
                                            finished),
            pending_requests=int(total(gw, QUEUE_DEPTH) or 0),
            in_flight_requests=None if in_flight is None else int(in_flight),
            arrivals_total=arrivals.value,
            ttft_s=ttft.observations(),
            tpot_s=tpot.observations(),
        ))

    def state_size(self) -> int:
        """Per-source readings, bucket bounds and drop reasons held (bounded by what exists)."""
        return (sum(cw.num_sources for w in self._windows.values() for cw in w.values())
                + sum(len(h) for hs in self._hists.values() for h in hs.values())
                + len(self._dropped))

    def forget(self, tier: str) -> None:
        """Drop a tier's windows (the tier is gone)."""
        self._windows.pop(tier, None)
        self._hists.pop(tier, None)


def _model_selector(models: Collection[str]) -> str:
    """``{model=~"a|b"}``: the names as an RE2 alternation inside a PromQL string."""
    alternation = "|".join(re.escape(m) for m in sorted(models))
    return '{model=~"' + alternation.replace("\\", "\\\\").replace('"', '\\"') + '"}'


class PrometheusSource:
    """Asks a Prometheus server (``/api/v1/query``) for the tier's windowed signals."""

    name = "prometheus"

    def __init__(self, url: str, http: httpx.AsyncClient, window_s: float,
                 custom: Mapping[str, Mapping[str, str]] | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 models: Mapping[str, Collection[str]] | None = None) -> None:
        """``custom``: tier -> {custom_name: PromQL}; ``$tier`` in a query is replaced.

        ``models``: tier -> its model names; the gateway's per-model series (queue, TTFT)
        are then selected by model rather than by the scrape target's tier label.
        """
        self.url = url.rstrip("/")
        self.models = models or {}
        self.http = http
        self.window = f"{max(1, round(window_s))}s"
        self.custom = custom or {}
        self.timeout_s = timeout_s

    async def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's result as (labels, value) pairs, every value finite."""
        try:
            resp = await asyncio.wait_for(
                self.http.get(self.url + "/api/v1/query", params={"query": promql}),
                self.timeout_s)
            body = resp.json()
        except (httpx.HTTPError, TimeoutError, ValueError) as err:
            raise ObservationError(f"Prometheus at {self.url} unreachable or not JSON: "
                                   f"{type(err).__name__}: {err}") from err
        try:
            if body.get("status") != "success":
                raise ObservationError(f"Prometheus rejected {promql!r}: "
                                       f"{body.get('errorType')}: {body.get('error')}")
            data = body["data"]
            if data["resultType"] == "scalar":
                out = [({}, float(data["result"][1]))]
            elif data["resultType"] != "vector":
                raise ObservationError(f"{promql!r} must return an instant vector or scalar, "
                                       f"got a {data['resultType']}")
            else:
                out = [({str(k): str(v) for k, v in r["metric"].items()}, float(r["value"][1]))
                       for r in data["result"]]
        except ObservationError:
            raise
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:
            raise ObservationError(f"Prometheus answer to {promql!r} has the wrong shape: "
                                   f"{type(err).__name__}: {err}") from err
        for _, v in out:
            if not math.isfinite(v):
                raise ObservationError(f"Prometheus answered {v} to {promql!r}")
        return out

    async def scalar(self, promql: str) -> float:
        """The sum of a query's result (0 when it has no series yet)."""
        return sum(v for _, v in await self.query(promql))

    async def signals(self, tier: str, replicas: list[Replica], now: float) -> TierSignals:
        """One round of queries, concurrently."""
        sel, w = f'{{tier="{tier}"}}', self.window
        models = self.models.get(tier)
        by_model = sel if models is None else _model_selector(models)
        scalars = {
            "rate": f"sum(rate({ARRIVALS}{sel}[{w}]))",
            "arrivals": f"sum({ARRIVALS}{sel})",
            "pending": f"sum({QUEUE_DEPTH}{by_model})",
            "in_flight": f"sum({IN_FLIGHT}{sel})",
            "prompt": f"sum(increase({PROMPT_TOKENS}{sel}[{w}]))",
            "generation": f"sum(increase({GENERATION_TOKENS}{sel}[{w}]))",
            "finished": f"sum(increase({FINISHED}{sel}[{w}]))",
        }
        custom = {name: q.replace("$tier", tier) for name, q in self.custom.get(tier, {}).items()}
        hists = {"ttft": (GATEWAY_TTFT, by_model), "tpot": (ENGINE_TPOT, sel)}
        names = list(scalars) + list(custom)
        results = await asyncio.gather(
            *(self.scalar(q) for q in [*scalars.values(), *custom.values()]),
            *(self.query(f"sum by (le) (increase({m}{s}[{w}]))") for m, s in hists.values()))
        values = dict(zip(names, results[:len(names)], strict=True))
        obs = {}
        for key, result in zip(hists, results[len(names):], strict=True):
            try:
                cumulative = {float(labels["le"]): v for labels, v in result if "le" in labels}
            except ValueError as err:
                raise ObservationError(f"{key} histogram has a bad 'le' label: {err}") from err
            if len(cumulative) > MAX_BUCKET_BOUNDS:
                raise ObservationError(f"{key} histogram has {len(cumulative)} bucket bounds")
            obs[key] = histogram_observations(cumulative)
        return check_signals(TierSignals(
            arrival_rate_rps=values["rate"],
            mean_prompt_tokens=_per_request(values["prompt"], values["finished"]),
            mean_output_tokens=_per_request(values["generation"], values["finished"]),
            pending_requests=int(round(values["pending"])),
            in_flight_requests=int(round(values["in_flight"])),
            arrivals_total=values["arrivals"],
            ttft_s=obs["ttft"], tpot_s=obs["tpot"],
            extra={name: values[name] for name in custom},
        ))


class Observer:
    """Builds each tier's ``TierState`` from the platform, /load reads and a signal source."""

    def __init__(self, platform: Platform, source: SignalSource, http: httpx.AsyncClient,
                 startup_memory: int = 20, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 registry: CollectorRegistry | None = None) -> None:
        """``startup_memory``: how many recent start-up durations a tier remembers.

        ``timeout_s`` bounds each /load read, body included (a replica that trickles
        bytes must not hold the tick); ``registry`` receives the dropped-samples counter.
        """
        self.platform = platform
        self.source = source
        self.http = http
        self.startup_memory = startup_memory
        self.timeout_s = timeout_s
        self._startups: dict[str, deque[float]] = {}
        self._counted: dict[str, set[tuple[str, float]]] = {}  # tier -> (replica, start)
        self._arrivals: dict[str, tuple[float, float | None]] = {}  # total, last change
        self._dropped: dict[str, dict[str, str]] = {}  # tier -> replica -> why
        self.dropped_samples = Counter(
            "strata_autoscaler_dropped_samples",
            "Replica load reports left out of a tick (unreachable, slow or invalid).",
            ["tier", "reason"], registry=registry or CollectorRegistry())

    async def _read_load(self, url: str) -> LoadReport:
        resp = await asyncio.wait_for(self.http.get(url + "/load"), self.timeout_s)
        if resp.status_code != 200:
            raise ValueError(f"HTTP {resp.status_code}")
        return parse_load_report(resp.json())

    async def _load(self, tier: str, replica: Replica) -> LoadReport | None:
        if replica.url is None or replica.phase in ("starting", "backoff"):
            return None
        dropped = self._dropped.setdefault(tier, {})
        try:
            report = await self._read_load(replica.url)
        except (httpx.HTTPError, TimeoutError, ValueError) as err:
            # ValueError covers a body that is not JSON and one that is not a LoadReport.
            kind = ("timeout" if isinstance(err, TimeoutError | httpx.TimeoutException)
                    else "unreachable" if isinstance(err, httpx.HTTPError) else "invalid")
            self.dropped_samples.labels(tier, kind).inc()
            why = f"{type(err).__name__}: {err}"
            if dropped.get(replica.replica_id) != why:
                log.warning("tier %s: replica %s /load left out of this tick: %s",
                            tier, replica.replica_id, why)
            dropped[replica.replica_id] = why
            return None
        dropped.pop(replica.replica_id, None)
        return report

    def _note_startups(self, tier: str, replicas: list[Replica]) -> tuple[float, ...]:
        memory = self._startups.setdefault(tier, deque(maxlen=self.startup_memory))
        counted = self._counted.setdefault(tier, set())
        present = {(r.replica_id, r.started_at) for r in replicas}
        counted &= present  # a replica (process) that is gone is never seen again
        for r in replicas:
            key = (r.replica_id, r.started_at)
            if r.startup_s is not None and key not in counted:
                counted.add(key)
                memory.append(r.startup_s)
        return tuple(memory)

    def state_size(self) -> int:
        """Entries held across every tier (for tests that check state stays bounded)."""
        return (sum(len(c) for c in self._counted.values())
                + sum(len(d) for d in self._dropped.values())
                + sum(len(m) for m in self._startups.values()) + len(self._arrivals))

    def forget(self, tier: str) -> None:
        """Drop everything kept about a tier that is gone (its source's windows too)."""
        for state in (self._startups, self._counted, self._arrivals, self._dropped):
            state.pop(tier, None)
        forget = getattr(self.source, "forget", None)
        if forget is not None:
            forget(tier)

    async def observe(self, tier: str, now: float) -> TierState:
        """The tier's state at ``now`` (on the platform's clock)."""
        replicas = self.platform.replicas(tier)
        dropped = self._dropped.get(tier)
        if dropped:
            for gone in set(dropped) - {r.replica_id for r in replicas}:
                del dropped[gone]
        reports, signals = await asyncio.gather(
            asyncio.gather(*(self._load(tier, r) for r in replicas)),
            self.source.signals(tier, replicas, now))
        samples = tuple(
            ReplicaSample(replica_id=r.replica_id, started_at=r.started_at, ready=r.ready,
                          ready_changed_at=r.ready_at, terminating=r.terminating,
                          report=rep, sampled_at=now if rep is not None else None,
                          capacity=r.capacity)
            for r, rep in zip(replicas, reports, strict=True))
        last_total, last_at = self._arrivals.get(tier, (0.0, None))
        if signals.arrivals_total > last_total:
            last_at = now
        self._arrivals[tier] = (signals.arrivals_total, last_at)
        return TierState(
            tier=tier, current_replicas=self.platform.desired(tier), replicas=samples,
            arrival_rate_rps=signals.arrival_rate_rps,
            mean_prompt_tokens=signals.mean_prompt_tokens,
            mean_output_tokens=signals.mean_output_tokens,
            pending_requests=signals.pending_requests,
            in_flight_requests=signals.in_flight_requests,
            last_request_at=last_at, ttft_s=signals.ttft_s, tpot_s=signals.tpot_s,
            startup_s=self._note_startups(tier, replicas), extra=dict(signals.extra))
