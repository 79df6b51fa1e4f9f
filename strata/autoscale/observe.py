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
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import httpx

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


class ObservationError(Exception):
    """A tier's signals could not be read this tick (the decision is skipped)."""


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
                 window_s: float) -> None:
        """``gateway_metrics`` returns the gateway's /metrics text (in-process or HTTP)."""
        self.gateway_metrics = gateway_metrics
        self.http = http
        self.window_s = window_s
        self._windows: dict[str, dict[str, CounterWindow]] = {}
        self._hists: dict[str, dict[str, HistogramWindow]] = {}

    def _counter(self, tier: str, name: str) -> CounterWindow:
        return self._windows.setdefault(tier, {}).setdefault(name, CounterWindow(self.window_s))

    def _hist(self, tier: str, name: str) -> HistogramWindow:
        return self._hists.setdefault(tier, {}).setdefault(name, HistogramWindow(self.window_s))

    async def _scrape(self, url: str) -> list[Sample] | None:
        try:
            resp = await self.http.get(url + "/metrics")
            return parse_samples(resp.text) if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None  # a replica going away mid-scrape: its counters leave the sum

    async def signals(self, tier: str, replicas: list[Replica], now: float) -> TierSignals:
        """Scrape, fold into the windows, and read the windows."""
        try:
            gw = parse_samples(await self.gateway_metrics())
        except (httpx.HTTPError, ValueError) as err:
            raise ObservationError(f"gateway /metrics unreadable: {err}") from err
        urls = [r.url for r in replicas if r.url is not None]
        pages = await asyncio.gather(*(self._scrape(u) for u in urls))
        engines = {u: p for u, p in zip(urls, pages, strict=True) if p is not None}

        arrivals = self._counter(tier, ARRIVALS)
        arrivals.update(now, {"gateway": total(gw, ARRIVALS, tier=tier) or 0.0})
        for name in (PROMPT_TOKENS, GENERATION_TOKENS, FINISHED):
            self._counter(tier, name).update(now, {u: total(p, name) or 0.0
                                                   for u, p in engines.items()})
        ttft = self._hist(tier, GATEWAY_TTFT)
        ttft.update(now, {"gateway": buckets(gw, GATEWAY_TTFT)})
        tpot = self._hist(tier, ENGINE_TPOT)
        tpot.update(now, {u: buckets(p, ENGINE_TPOT) for u, p in engines.items()})

        finished = self._counter(tier, FINISHED).increase()
        in_flight = total(gw, IN_FLIGHT)
        return TierSignals(
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
        )


class PrometheusSource:
    """Asks a Prometheus server (``/api/v1/query``) for the tier's windowed signals."""

    name = "prometheus"

    def __init__(self, url: str, http: httpx.AsyncClient, window_s: float,
                 custom: Mapping[str, Mapping[str, str]] | None = None) -> None:
        """``custom``: tier -> {custom_name: PromQL}; ``$tier`` in a query is replaced."""
        self.url = url.rstrip("/")
        self.http = http
        self.window = f"{max(1, round(window_s))}s"
        self.custom = custom or {}

    async def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's result as (labels, value) pairs."""
        try:
            resp = await self.http.get(self.url + "/api/v1/query", params={"query": promql})
            body = resp.json()
        except (httpx.HTTPError, json.JSONDecodeError) as err:
            raise ObservationError(f"Prometheus at {self.url} unreachable: {err}") from err
        if body.get("status") != "success":
            raise ObservationError(f"Prometheus rejected {promql!r}: "
                                   f"{body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise ObservationError(f"{promql!r} must return an instant vector or scalar, "
                                   f"got a {data['resultType']}")
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    async def scalar(self, promql: str) -> float:
        """The sum of a query's result (0 when it has no series yet)."""
        return sum(v for _, v in await self.query(promql))

    async def signals(self, tier: str, replicas: list[Replica], now: float) -> TierSignals:
        """One round of queries, concurrently."""
        sel, w = f'{{tier="{tier}"}}', self.window
        scalars = {
            "rate": f"sum(rate({ARRIVALS}{sel}[{w}]))",
            "arrivals": f"sum({ARRIVALS}{sel})",
            "pending": f"sum({QUEUE_DEPTH}{sel})",
            "in_flight": f"sum({IN_FLIGHT}{sel})",
            "prompt": f"sum(increase({PROMPT_TOKENS}{sel}[{w}]))",
            "generation": f"sum(increase({GENERATION_TOKENS}{sel}[{w}]))",
            "finished": f"sum(increase({FINISHED}{sel}[{w}]))",
        }
        custom = {name: q.replace("$tier", tier) for name, q in self.custom.get(tier, {}).items()}
        hists = {"ttft": GATEWAY_TTFT, "tpot": ENGINE_TPOT}
        names = list(scalars) + list(custom)
        results = await asyncio.gather(
            *(self.scalar(q) for q in [*scalars.values(), *custom.values()]),
            *(self.query(f"sum by (le) (increase({m}{sel}[{w}]))") for m in hists.values()))
        values = dict(zip(names, results[:len(names)], strict=True))
        obs = {}
        for key, result in zip(hists, results[len(names):], strict=True):
            obs[key] = histogram_observations({float(labels["le"]): v for labels, v in result
                                               if "le" in labels})
        return TierSignals(
            arrival_rate_rps=values["rate"],
            mean_prompt_tokens=_per_request(values["prompt"], values["finished"]),
            mean_output_tokens=_per_request(values["generation"], values["finished"]),
            pending_requests=int(round(values["pending"])),
            in_flight_requests=int(round(values["in_flight"])),
            arrivals_total=values["arrivals"],
            ttft_s=obs["ttft"], tpot_s=obs["tpot"],
            extra={name: values[name] for name in custom},
        )


class Observer:
    """Builds each tier's ``TierState`` from the platform, /load reads and a signal source."""

    def __init__(self, platform: Platform, source: SignalSource, http: httpx.AsyncClient,
                 startup_memory: int = 20) -> None:
        """``startup_memory``: how many recent start-up durations a tier remembers."""
        self.platform = platform
        self.source = source
        self.http = http
        self.startup_memory = startup_memory
        self._startups: dict[str, deque[float]] = {}
        self._counted: set[tuple[str, float]] = set()
        self._arrivals: dict[str, tuple[float, float | None]] = {}  # total, last change

    async def _load(self, replica: Replica) -> LoadReport | None:
        if replica.url is None or replica.phase in ("starting", "backoff"):
            return None
        try:
            resp = await self.http.get(replica.url + "/load")
            if resp.status_code != 200:
                return None
            return LoadReport.from_dict(resp.json())
        except (httpx.HTTPError, ValueError, TypeError):
            return None

    def _note_startups(self, tier: str, replicas: list[Replica]) -> tuple[float, ...]:
        memory = self._startups.setdefault(tier, deque(maxlen=self.startup_memory))
        for r in replicas:
            key = (r.replica_id, r.started_at)
            if r.startup_s is not None and key not in self._counted:
                self._counted.add(key)
                memory.append(r.startup_s)
        return tuple(memory)

    async def observe(self, tier: str, now: float) -> TierState:
        """The tier's state at ``now`` (on the platform's clock)."""
        replicas = self.platform.replicas(tier)
        reports, signals = await asyncio.gather(
            asyncio.gather(*(self._load(r) for r in replicas)),
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
