"""The gateway's replica set: connection pools, load polling, health, ejection, activation.

Each replica has one keep-alive connection pool for proxied requests (strata.gateway.upstream)
and one background task (sharing a pooled httpx client) that checks /health
every ``health_interval_s`` and reads load every ``poll_interval_s``: strata's /load when
the replica serves it, else the vLLM/SGLang series of its /metrics, else nothing (the
router then sees only the gateway's in-flight counts). A replica is routable when its last
health check passed, it is not ejected, and its report (if any) says ready and not
draining. ``eject_after_failures`` consecutive failed requests, or one refused connection,
take it out for an exponentially growing time; it returns when that time is over and a
health check passes.

The set is updatable at runtime (``set_endpoints``) so a platform can feed it, and when a
tier has no ready replica a request can call the ``on_demand(tier)`` activator and wait.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from strata.gateway.metrics import GatewayMetrics
from strata.gateway.prefix_index import PrefixIndex
from strata.gateway.probe import MetricsLoad, parse_metrics
from strata.gateway.upstream import UpstreamPool
from strata.load import LoadReport
from strata.routing.types import Demand, ReplicaState, RouteRequest, Snapshot

log = logging.getLogger("strata.gateway")

OnDemand = Callable[[str], Awaitable[None]]

_COMPLETION_WINDOW_S = 10.0


@dataclass(frozen=True, slots=True)
class ReplicaSetConfig:
    """Polling, timeouts and ejection of the replicas."""

    poll_interval_s: float = 0.2
    health_interval_s: float = 1.0
    probe_timeout_s: float = 1.0
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 300.0  # longest silence from a replica mid-response (and to TTFT)
    eject_after_failures: int = 3
    eject_base_s: float = 2.0
    eject_max_s: float = 60.0
    prefix_capacity_chunks: int = 8192  # until the replica reports its KV size
    upstream_api_key: str | None = None
    # After on_demand(tier) returns, the replica it started needs time to load and pass a
    # health check; asking again sooner would only start more replicas for the same burst.
    reactivate_after_s: float = 10.0

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0 or self.health_interval_s <= 0:
            raise ValueError("poll_interval_s and health_interval_s must be > 0")
        if self.eject_after_failures < 1:
            raise ValueError("eject_after_failures must be >= 1")


def normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port``; fail fast otherwise."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host or parsed.path not in ("", "/"):
        raise ValueError(f"replica URL {url!r} must look like http://host:port")
    return url


class Replica:
    """Runtime record of one replica (mutable; only the event loop touches it)."""

    def __init__(self, url: str, config: ReplicaSetConfig, tier: str) -> None:
        """Create the record; connections open on first use."""
        self.url = url
        self.url_bytes = url.encode()
        self.tier = tier
        self.config = config
        self.pool = UpstreamPool(url, config.connect_timeout_s, config.read_timeout_s)
        self.extra_headers = (b"Authorization: Bearer %s\r\n" % config.upstream_api_key.encode()
                              if config.upstream_api_key else b"")
        self.healthy = False  # until the first health check passes
        self.ejected_until = 0.0
        self.ejections = 0
        self.consecutive_failures = 0
        self.in_flight = 0
        self.load: LoadReport | None = None
        self.metrics_load: MetricsLoad | None = None
        self.load_source = "unknown"  # "load" | "metrics" | "none" | "unknown"
        # ticket -> (dispatch time, prompt tokens) of requests still waiting for their first
        # byte that no load reading has included yet (their prefill is still ahead)
        self.pending: OrderedDict[int, tuple[float, int]] = OrderedDict()
        self.pending_tokens = 0
        self._tickets = itertools.count()
        self.prefix = PrefixIndex(config.prefix_capacity_chunks)
        self.finishes: deque[float] = deque()
        self.models: frozenset[str] = frozenset()
        self.model_cards: list[dict[str, Any]] = []
        self.removed = False
        self.task: asyncio.Task[None] | None = None
        self.check_now = asyncio.Event()  # set to make the poller check health at once

    def routable(self, now: float) -> bool:
        """Healthy, not ejected, and (if it reports) ready and not draining."""
        if not self.healthy or self.removed or now < self.ejected_until:
            return False
        return self.load is None or (self.load.ready and not self.load.draining)

    # -- request bookkeeping -------------------------------------------------------------

    def begin(self, request: RouteRequest, now: float) -> int:
        """Count a dispatched request, remember its prefix as likely cached; a ticket."""
        self.in_flight += 1
        ticket = next(self._tickets)
        self.pending[ticket] = (now, request.prompt_tokens)
        self.pending_tokens += request.prompt_tokens
        self.prefix.insert(request.prefix_hashes)
        return ticket

    def first_byte(self, ticket: int) -> None:
        """The request's prefill is done: it no longer waits in the replica's queue."""
        entry = self.pending.pop(ticket, None)
        if entry is not None:
            self.pending_tokens -= entry[1]

    def end(self, ticket: int, now: float, completed: bool) -> None:
        """Un-count a request; completed ones feed the measured completion rate."""
        self.first_byte(ticket)
        self.in_flight -= 1
        if completed:
            self.finishes.append(now)

    def record_success(self) -> None:
        """A request got its first byte: the failure streak is over."""
        self.consecutive_failures = 0
        self.ejections = 0

    def record_failure(self, now: float, refused: bool) -> bool:
        """Count a failed attempt; eject when the streak is long enough. True if ejected."""
        self.consecutive_failures += 1
        if not refused and self.consecutive_failures < self.config.eject_after_failures:
            return False
        self.ejections += 1
        backoff = self.config.eject_base_s * 2 ** (self.ejections - 1)
        self.ejected_until = now + min(self.config.eject_max_s, backoff)
        self.consecutive_failures = 0
        self.healthy = False  # back only after a passing health check
        return True

    def completions_per_s(self, now: float) -> float:
        """Requests finished per second over the last few seconds."""
        cutoff = now - _COMPLETION_WINDOW_S
        f = self.finishes
        while f and f[0] < cutoff:
            f.popleft()
        return len(f) / _COMPLETION_WINDOW_S

    def accept_report(self, sent_at: float, chunk_tokens: int) -> None:
        """A load reading requested at ``sent_at`` includes requests dispatched before it."""
        p = self.pending
        while p:
            ticket, (t, tokens) = next(iter(p.items()))
            if t >= sent_at:
                break
            del p[ticket]
            self.pending_tokens -= tokens
        load = self.load
        if load is not None and load.total_kv_blocks > 0 and load.block_size > 0:
            # The replica can hold at most its KV cache's worth of prefixes.
            self.prefix.resize(load.total_kv_blocks * load.block_size // chunk_tokens)

    def state(self, request: RouteRequest, now: float, chunk_tokens: int) -> ReplicaState:
        """This replica as the router sees it for ``request``."""
        load, mload = self.load, self.metrics_load
        if load is not None:
            running, waiting, kv = load.running, load.waiting, load.kv_usage
        elif mload is not None:
            running, waiting, kv = mload.running, mload.waiting, mload.kv_usage
        else:
            running = waiting = 0
            kv = 0.0
        match = self.prefix.match(request.prefix_hashes) if request.prefix_hashes else 0
        return ReplicaState(
            url=self.url, healthy=self.routable(now), in_flight=self.in_flight,
            running=running, waiting=waiting, kv_usage=kv, load=load,
            pending_requests=len(self.pending), pending_prompt_tokens=self.pending_tokens,
            prefix_match_tokens=match * chunk_tokens,
            completions_per_s=self.completions_per_s(now) if self.finishes else 0.0,
            models=self.models)


class ReplicaSet:
    """The replicas of one tier, kept current by background pollers."""

    def __init__(self, tier: str, config: ReplicaSetConfig, metrics: GatewayMetrics,
                 on_demand: OnDemand | None = None, chunk_tokens: int = 64) -> None:
        """Nothing runs until ``set_endpoints`` is awaited inside the event loop.

        ``chunk_tokens`` is the prompt estimator's prefix chunk, to size prefix indexes.
        """
        self.tier = tier
        self.chunk_tokens = chunk_tokens
        self.config = config
        self.metrics = metrics
        self.on_demand = on_demand
        self.replicas: dict[str, Replica] = {}
        self._changed = asyncio.Event()
        self._activation: asyncio.Task[None] | None = None
        self._activated_at = 0.0
        self._ready = 0
        self._http: httpx.AsyncClient | None = None
        self.metrics.tier_replicas.labels(tier=tier).set(0)

    # -- membership ----------------------------------------------------------------------

    async def set_endpoints(self, urls: Iterable[str]) -> None:
        """Make the set exactly ``urls``: start new replicas, retire missing ones.

        A retired replica stops taking requests now; its idle connections close, and the
        ones carrying streams close as those streams end.
        """
        wanted = dict.fromkeys(normalize_url(u) for u in urls)  # ordered, deduplicated
        if self._http is None:
            headers = {"Authorization": f"Bearer {self.config.upstream_api_key}"} \
                if self.config.upstream_api_key else None
            self._http = httpx.AsyncClient(timeout=self.config.probe_timeout_s,
                                           headers=headers)
        for url in [u for u in wanted if u not in self.replicas]:
            r = Replica(url, self.config, self.tier)
            self.replicas[url] = r
            r.task = asyncio.create_task(self._poll(r), name=f"poll {url}")
        for url in [u for u in self.replicas if u not in wanted]:
            r = self.replicas.pop(url)
            r.removed = True
            if r.task is not None:
                r.task.cancel()
            try:
                self.metrics.replica_healthy.remove(url)
            except KeyError:
                pass
            await r.pool.close()
        self._notify()

    async def close(self) -> None:
        """Stop every poller and close every pool."""
        tasks = [r.task for r in self.replicas.values() if r.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.pool.close() for r in self.replicas.values()))
        self.replicas.clear()
        if self._activation is not None:
            self._activation.cancel()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- routing view --------------------------------------------------------------------

    def snapshot(self, request: RouteRequest, seq: int, demand: Demand,
                 exclude: set[str] | frozenset[str] = frozenset()) -> Snapshot:
        """The frozen view a policy decides on (replicas in ``exclude`` left out)."""
        now = time.monotonic()
        chunk = request.prefix_chunk_tokens
        states = tuple(r.state(request, now, chunk) for url, r in self.replicas.items()
                       if url not in exclude)
        return Snapshot(states, seq, demand)

    def ready_count(self) -> int:
        """Routable replicas now."""
        now = time.monotonic()
        return sum(1 for r in self.replicas.values() if r.routable(now))

    def model_cards(self) -> list[dict[str, Any]]:
        """The union of healthy replicas' /v1/models entries, one per model id."""
        seen: dict[str, dict[str, Any]] = {}
        for r in self.replicas.values():
            if r.healthy:
                for card in r.model_cards:
                    seen.setdefault(str(card.get("id")), card)
        return list(seen.values())

    def _notify(self) -> None:
        """Wake everything waiting for the set to change, and refresh the tier gauge."""
        ready = self.ready_count()
        if ready != self._ready:
            self._ready = ready
            self.metrics.tier_replicas.labels(tier=self.tier).set(ready)
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, timeout_s: float) -> None:
        """Return when replicas change (health, membership) or after ``timeout_s``."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass

    def activate(self) -> asyncio.Task[None] | None:
        """Call ``on_demand(tier)`` unless one is running or finished recently.

        Returns the current (or just finished) activation task, None without a hook.
        """
        if self.on_demand is None:
            return None
        a = self._activation
        if a is None or (a.done() and time.monotonic() - self._activated_at
                         >= self.config.reactivate_after_s):
            self._activation = asyncio.create_task(self._run_activation(),
                                                   name=f"activate {self.tier}")
        return self._activation

    async def _run_activation(self) -> None:
        assert self.on_demand is not None
        try:
            await self.on_demand(self.tier)
        except Exception:
            log.exception("activating tier %s failed", self.tier)
            raise
        finally:
            self._activated_at = time.monotonic()
            self._notify()  # waiters re-check, success or not

    def note_failure(self, r: Replica, refused: bool, kind: str) -> None:
        """Record a failed attempt on ``r`` in its streak and the metrics.

        Short of ejection, the replica's health is checked at once: a crashed replica is
        then out within a round trip instead of a health interval.
        """
        self.metrics.upstream_errors.labels(replica=r.url, kind=kind).inc()
        r.check_now.set()
        if r.record_failure(time.monotonic(), refused):
            self.metrics.ejections.labels(replica=r.url).inc()
            log.warning("replica %s taken out for %.1f s after %s", r.url,
                        r.ejected_until - time.monotonic(), kind)
            self._set_health_gauge(r)
            self._notify()

    def _set_health_gauge(self, r: Replica) -> None:
        if not r.removed:
            up = r.routable(time.monotonic())
            self.metrics.replica_healthy.labels(replica=r.url).set(1 if up else 0)

    # -- polling -------------------------------------------------------------------------

    async def _poll(self, r: Replica) -> None:
        """Health every health_interval_s, load every poll_interval_s, until removed."""
        next_health = 0.0
        while not r.removed:
            now = time.monotonic()
            if now >= next_health:
                await self._check_health(r)
                next_health = time.monotonic() + self.config.health_interval_s
            if r.healthy and r.load_source != "none":
                before = r.routable(time.monotonic())
                if not await self._read_load(r):
                    next_health = 0.0  # check health now rather than route into a dead replica
                if r.routable(time.monotonic()) != before:
                    self._set_health_gauge(r)
                    self._notify()
            until_health = max(0.001, next_health - time.monotonic())
            delay = min(self.config.poll_interval_s, until_health) if r.healthy else until_health
            try:
                await asyncio.wait_for(r.check_now.wait(), delay)
            except TimeoutError:
                continue
            r.check_now.clear()
            next_health = 0.0

    async def _get(self, r: Replica, path: str) -> tuple[int, bytes]:
        assert self._http is not None
        resp = await self._http.get(r.url + path)
        return resp.status_code, resp.content

    async def _check_health(self, r: Replica) -> None:
        before = r.routable(time.monotonic())
        try:
            status, _ = await self._get(r, "/health")
            ok = status == 200
        except (httpx.HTTPError):
            ok = False
        was_healthy = r.healthy
        if ok and time.monotonic() >= r.ejected_until:
            r.healthy = True
        elif not ok:
            r.healthy = False
        if r.healthy and not was_healthy:
            r.load_source = "unknown"  # possibly a new process behind the same URL
            await self._read_models(r)
        if r.routable(time.monotonic()) != before:
            log.info("replica %s is %s", r.url, "in" if not before else "out")
            self._set_health_gauge(r)
            self._notify()

    async def _read_models(self, r: Replica) -> None:
        try:
            status, body = await self._get(r, "/v1/models")
            if status == 200:
                data = json.loads(body).get("data", [])
                r.model_cards = [c for c in data if isinstance(c, dict) and "id" in c]
                r.models = frozenset(str(c["id"]) for c in r.model_cards)
        except (httpx.HTTPError, ValueError, AttributeError) as err:
            log.debug("replica %s: /v1/models unreadable: %s", r.url, err)

    async def _read_load(self, r: Replica) -> bool:
        """Read the replica's load; False when it could not be reached at all."""
        sent_at = time.monotonic()
        try:
            if r.load_source in ("unknown", "load"):
                status, body = await self._get(r, "/load")
                if status == 200:
                    r.load = LoadReport.from_dict(json.loads(body))
                    r.load_source = "load"
                    r.accept_report(sent_at, self.chunk_tokens)
                    return True
                if r.load_source == "load" or status not in (404, 405):
                    return True  # transient (e.g. 503 while loading): keep the source
                r.load = None
            status, body = await self._get(r, "/metrics")
            mload = parse_metrics(body) if status == 200 else None
            r.metrics_load = mload
            r.load_source = "metrics" if mload is not None else "none"
            if mload is not None:
                r.accept_report(sent_at, self.chunk_tokens)
        except httpx.TransportError as err:
            log.debug("replica %s: unreachable for load: %s", r.url, err)
            return False
        except (httpx.HTTPError, ValueError, TypeError) as err:
            log.debug("replica %s: load unreadable: %s", r.url, err)
        return True
