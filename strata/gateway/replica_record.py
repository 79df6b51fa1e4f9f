"""One replica as the gateway tracks it: connections, load, failures, prefix model.

A mutable record that only the event loop touches; ``state()`` freezes it into the
ReplicaState a routing policy sees. Ejection: ``eject_after_failures`` consecutive failed
requests, or one refused connection, take the replica out for an exponentially growing
time; it returns when that time is over and a health check passes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import httpx

from strata.gateway.prefix_index import PrefixIndex
from strata.gateway.probe import MetricsLoad
from strata.gateway.upstream import UpstreamPool
from strata.load import LoadReport
from strata.routing.types import ReplicaState, RouteRequest

_COMPLETION_WINDOW_S = 10.0


@dataclass(frozen=True, slots=True)
class ReplicaSetConfig:
    """Polling, timeouts and ejection of the replicas."""

    poll_interval_s: float = 0.2
    health_interval_s: float = 1.0
    probe_timeout_s: float = 1.0
    connect_timeout_s: float = 3.0
    # Silence from a replica (first token included) after which the gateway checks that the
    # replica still answers its probes; the request fails only if it does not.
    read_timeout_s: float = 300.0
    request_timeout_s: float | None = None  # hard cap on one request; None: none
    eject_after_failures: int = 3
    eject_base_s: float = 2.0
    eject_max_s: float = 60.0
    prefix_capacity_chunks: int = 8192  # until the replica reports its KV size
    # Prefix reports (GET /internal/prefix): the cluster's internal token, if it has one, and
    # how long a prompt this gateway sent counts as held before a report must show it (the
    # engine admits a prompt between two steps, which can take a second on a CPU).
    internal_token: str | None = None
    prefix_grace_s: float = 2.0
    upstream_api_key: str | None = None
    # After on_demand(tier) returns, the replica it started needs time to load and pass a
    # health check; asking again sooner would only start more replicas for the same burst.
    reactivate_after_s: float = 10.0

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0 or self.health_interval_s <= 0:
            raise ValueError("poll_interval_s and health_interval_s must be > 0")
        if self.eject_after_failures < 1:
            raise ValueError("eject_after_failures must be >= 1")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0 (or unset for no cap)")

    @property
    def contact_window_s(self) -> float:
        """How recent a probe answer must be for a silent replica to count as alive."""
        return 3 * self.health_interval_s + self.probe_timeout_s


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
        self.pool = UpstreamPool(url, config.connect_timeout_s, config.read_timeout_s,
                                 alive=self.alive, recheck_s=config.health_interval_s,
                                 request_timeout_s=config.request_timeout_s)
        self.extra_headers = (b"Authorization: Bearer %s\r\n" % config.upstream_api_key.encode()
                              if config.upstream_api_key else b"")
        self.healthy = False  # until the first health check passes
        self.last_contact = -1e18  # when it last answered a probe (health, draining or load)
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
        self.prefix = PrefixIndex(config.prefix_capacity_chunks, config.prefix_grace_s)
        self.prefix_source = "unknown"  # "engine" | "none" | "unknown": /internal/prefix
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

    def alive(self) -> bool:
        """It answered a probe recently (maybe draining): its silence is work, not failure."""
        return time.monotonic() - self.last_contact <= self.config.contact_window_s

    # -- request bookkeeping -------------------------------------------------------------

    def begin(self, request: RouteRequest, now: float) -> int:
        """Count a dispatched request, remember its prefix as likely cached; a ticket."""
        self.in_flight += 1
        ticket = next(self._tickets)
        self.pending[ticket] = (now, request.prompt_tokens)
        self.pending_tokens += request.prompt_tokens
        self.prefix.insert(request.prefix_hashes, now)
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
