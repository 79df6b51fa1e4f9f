"""The gateway's replica set: connection pools, load polling, health, ejection, activation.

Each replica (strata.gateway.replica_record) has one keep-alive connection pool for proxied
requests and one background task here (sharing a pooled httpx client) that checks /health
every ``health_interval_s`` and reads load every ``poll_interval_s``: strata's /load when
the replica serves it, else the vLLM/SGLang series of its /metrics, else nothing (the
router then sees only the gateway's in-flight counts). With each /load it also reads what
the replica's prefix cache holds (``/internal/prefix``, a delta since the last reading;
see strata.prefix_report), so every gateway routes by the same caches. A replica is routable when its last
health check passed, it is not ejected, and its report (if any) says ready and not
draining. A failed request or an unreachable /load makes the poller check health at once.

The set is updatable at runtime (``set_endpoints``) so a platform can feed it, and when a
tier has no ready replica a request can call the ``on_demand(tier)`` activator and wait.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpx

from strata.gateway.metrics import GatewayMetrics
from strata.gateway.probe import parse_metrics
from strata.gateway.replica_record import Replica, ReplicaSetConfig, normalize_url
from strata.internal_auth import headers as internal_headers
from strata.load import LoadReport
from strata.prefix_report import MAX_KEYS, PrefixReport, PrefixReportError
from strata.routing.types import Demand, RouteRequest, Snapshot

__all__ = ["OnDemand", "Replica", "ReplicaSet", "ReplicaSetConfig", "normalize_url"]

log = logging.getLogger("strata.gateway")

# A prefix report's body can hold MAX_KEYS keys of up to 10 digits each, plus separators.
_MAX_PREFIX_BODY = 12 * MAX_KEYS + 4096

OnDemand = Callable[[str], Awaitable[None]]


class ReplicaSet:
    """The replicas of one tier, kept current by background pollers."""

    def __init__(self, tier: str, config: ReplicaSetConfig, metrics: GatewayMetrics,
                 on_demand: OnDemand | None = None, chunk_tokens: int = 64,
                 served_models: tuple[str, ...] = (), chunk_bytes: int = 256) -> None:
        """Nothing runs until ``set_endpoints`` is awaited inside the event loop.

        ``chunk_tokens`` and ``chunk_bytes`` are the prompt estimator's prefix chunk, to size
        prefix indexes and to check that a replica's prefix reports use the same chunks.
        ``served_models`` are the names the tier serves by configuration, listed on
        /v1/models before any replica is ready.
        """
        self.tier = tier
        self.served_models = served_models
        self.chunk_tokens = chunk_tokens
        self.chunk_bytes = chunk_bytes
        self.config = config
        self.metrics = metrics
        self.on_demand = on_demand
        self.replicas: dict[str, Replica] = {}
        self._changed = asyncio.Event()
        self._activation: asyncio.Task[None] | None = None
        self._activated_at = 0.0
        self._ready = 0
        self._http: httpx.AsyncClient | None = None
        self._retiring: set[Replica] = set()  # removed, still carrying requests
        self.metrics.tier_replicas.labels(tier=tier).set(0)
        # Model names whose metric labels stay; the gateway widens it to every tier's.
        self.models_in_use: Callable[[], frozenset[str]] = self.known_models

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
            if r.in_flight and r.task is not None:
                # Its poller goes on until its last request ends: a silent request there
                # fails only if the replica stops answering probes.
                self._retiring.add(r)
                r.check_now.set()
            elif r.task is not None:
                r.task.cancel()
            self.metrics.forget_replica(url)
            await r.pool.close()
        self.metrics.keep_models(self.models_in_use() | {"other"})
        self._notify()

    async def close(self) -> None:
        """Stop every poller and close every pool."""
        tasks = [r.task for r in [*self.replicas.values(), *self._retiring]
                 if r.task is not None]
        self._retiring.clear()
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
        """One /v1/models entry per model id: replicas' own cards, then configured names.

        A configured model is listed while its replicas start (or the tier is at zero): a
        client that discovers the model first and then asks for it is held, not refused.
        """
        seen: dict[str, dict[str, Any]] = {}
        by_health = sorted(self.replicas.values(), key=lambda r: not r.healthy)
        for r in by_health:
            for card in r.model_cards:
                seen.setdefault(str(card.get("id")), card)
        for name in self.served_models:
            seen.setdefault(name, {"id": name, "object": "model", "created": 0,
                                   "owned_by": "strata", "root": name})
        return list(seen.values())

    def known_models(self) -> frozenset[str]:
        """Model names configured or reported by a current replica."""
        return frozenset(self.served_models).union(*(r.models for r in self.replicas.values()))

    def model_label(self, model: str) -> str:
        """``model`` as a metric label: known names as they are, anything else ``other``.

        Clients choose the model string, so it cannot label a series unchecked.
        """
        if model in self.served_models or any(model in r.models
                                              for r in self.replicas.values()):
            return model
        return "other"

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
        r.check_now.set()
        if r.removed:
            return  # its series are gone and it takes no more requests
        self.metrics.upstream_errors.labels(replica=r.url, kind=kind).inc()
        if r.record_failure(time.monotonic(), refused):
            self.metrics.ejections.labels(replica=r.url).inc()
            log.warning("replica %s taken out for %.1f s after %s", r.url,
                        r.ejected_until - time.monotonic(), kind)
            self._set_health_gauge(r)
            self._notify()

    def note_not_started(self, r: Replica, kind: str) -> None:
        """The replica answered "not started" (busy, draining): not a fault; re-read its state."""
        r.check_now.set()
        if not r.removed:
            self.metrics.upstream_errors.labels(replica=r.url, kind=kind).inc()

    def _set_health_gauge(self, r: Replica) -> None:
        if not r.removed:
            up = r.routable(time.monotonic())
            self.metrics.replica_healthy.labels(replica=r.url).set(1 if up else 0)

    # -- polling -------------------------------------------------------------------------

    async def _poll(self, r: Replica) -> None:
        """Health every health_interval_s, load every poll_interval_s, until removed."""
        next_health = 0.0
        while not r.removed or r.in_flight > 0:
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
        self._retiring.discard(r)

    async def _get(self, r: Replica, path: str) -> tuple[int, bytes]:
        assert self._http is not None
        resp = await self._http.get(r.url + path)
        return resp.status_code, resp.content

    async def _check_health(self, r: Replica) -> None:
        before = r.routable(time.monotonic())
        try:
            status, body = await self._get(r, "/health")
            ok = status == 200
            if ok or (status == 503 and b"draining" in body):
                r.last_contact = time.monotonic()  # answering: silence there is work
        except (httpx.HTTPError):
            ok = False
        was_healthy = r.healthy
        if ok and time.monotonic() >= r.ejected_until:
            r.healthy = True
        elif not ok:
            r.healthy = False
        if r.healthy and not was_healthy:
            r.load_source = "unknown"  # possibly a new process behind the same URL
            r.prefix_source = "unknown"
            r.prefix.forget_reports()
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
                    r.last_contact = time.monotonic()
                    r.load = LoadReport.from_dict(json.loads(body))
                    r.load_source = "load"
                    if set(r.load.lora_adapters) != _adapters(r):
                        await self._read_models(r)  # an adapter was loaded or unloaded
                    r.accept_report(sent_at, self.chunk_tokens)
                    if r.prefix_source != "none":
                        await self._read_prefix(r)
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

    async def _read_prefix(self, r: Replica) -> None:
        """Apply the change in the replica's prefix cache since the last reading.

        A replica without the endpoint (404: vLLM, a stage head, prefix caching off), one
        that refuses this gateway (no or another internal token) or one that chunks prompts
        otherwise is modelled from this gateway's own requests alone.
        """
        assert self._http is not None
        epoch, since = r.prefix.since()
        params = {"epoch": epoch, "since": since} if epoch is not None else None
        requested_at = time.monotonic()
        resp = await self._http.get(r.url + "/internal/prefix", params=params,
                                    headers=internal_headers(self.config.internal_token))
        status = resp.status_code
        if status in (401, 403, 404, 405):
            if status != 404 and status != 405:
                log.warning("replica %s refuses its prefix report (%d): give the gateway the "
                            "cluster's internal token; routing on this gateway's requests alone",
                            r.url, status)
            r.prefix_source = "none"
            r.prefix.forget_reports()
            return
        if status != 200:
            return  # transient: keep what was reported
        try:
            if len(resp.content) > _MAX_PREFIX_BODY:
                raise PrefixReportError(f"body of {len(resp.content)} bytes")
            report = PrefixReport.from_dict(json.loads(resp.content))
        except (ValueError, PrefixReportError) as err:
            log.warning("replica %s: unusable prefix report (%s); asking for all of it", r.url, err)
            r.prefix.forget_reports()
            return
        if (report.chunk_bytes, report.chunk_tokens) != (self.chunk_bytes, self.chunk_tokens):
            log.warning("replica %s hashes prompts in chunks of %d bytes / %d tokens, this "
                        "gateway in %d / %d: its prefix reports are not used; give the gateway "
                        "--bytes-per-token and --prefix-chunk-tokens that make the same", r.url,
                        report.chunk_bytes, report.chunk_tokens, self.chunk_bytes,
                        self.chunk_tokens)
            r.prefix_source = "none"
            r.prefix.forget_reports()
            return
        if not r.prefix.apply(report, requested_at):
            r.prefix.forget_reports()  # the next reading asks for the whole set
            return
        r.prefix_source = "engine"


def _adapters(r: Replica) -> set[str]:
    """The LoRA adapters among the replica's /v1/models cards (those with a ``parent``)."""
    return {str(c["id"]) for c in r.model_cards if c.get("parent")}
