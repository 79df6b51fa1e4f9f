"""The simulated gateway: strata's routing policies fed the same snapshot the real gateway builds.

For each request it builds the ``RouteRequest`` and ``Snapshot`` that
``strata.gateway.replica_set`` builds and calls the configured policy's ``pick``. A replica's
load report is re-read when it is older than ``poll_interval_s`` (the real gateway polls
every 0.2 s; here the read happens lazily at the next pick, as of that instant); requests
dispatched since the report count as ``pending``; ``completions_per_s`` is measured over
10 s; prefix matches come from the gateway's own ``PrefixIndex``, ``length_bucket``'s demand
from its ``DemandTracker``. With no routable replica the activator holds requests for up to
``hold_timeout_s``; a request no replica can ever hold is rejected.

Router states are cached per replica and rebuilt only when its report or counts change, and
reports are refreshed oldest first, so a pick costs the policy's own work plus the replicas
that changed, not a rebuild of the whole snapshot.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from strata.gateway.demand import DemandTracker
from strata.gateway.prefix_index import PrefixIndex
from strata.load import LoadReport
from strata.routing.registry import make_policy
from strata.routing.types import Demand, ReplicaState, RouteRequest, Snapshot
from strata.sim.events import EventLoop
from strata.sim.frozen import positional_constructor
from strata.sim.replica import SimReplica
from strata.sim.types import SimRequest

_COMPLETION_WINDOW_S = 10.0  # strata.gateway.replica_record
_NO_DEMAND = Demand()
_ANY_MODEL: frozenset[str] = frozenset()
_new_route_state = positional_constructor(  # a state per replica change
    ReplicaState, "url healthy in_flight running waiting kv_usage load pending_requests "
    "pending_prompt_tokens prefix_match_tokens completions_per_s models")
_new_snapshot = positional_constructor(Snapshot, "replicas seq demand")  # one per request


class _Endpoint:
    """The gateway's record of one replica (strata.gateway.replica_record.Replica, simulated)."""

    __slots__ = ("replica", "url", "in_flight", "pending", "pending_tokens", "report",
                 "report_at", "finishes", "prefix", "state", "dirty", "index")

    def __init__(self, replica: SimReplica, prefix_capacity: int) -> None:
        self.replica = replica
        self.url = replica.replica_id
        self.in_flight = 0
        self.pending: deque[int] = deque()  # prompt tokens dispatched since the report
        self.pending_tokens = 0
        self.report: LoadReport | None = None
        self.report_at = -math.inf
        self.finishes: deque[float] = deque()
        self.prefix = PrefixIndex(prefix_capacity)
        self.state: ReplicaState | None = None
        self.dirty = False
        self.index = -1  # position in the snapshot; -1 when not routable


class SimGateway:
    """Routes requests to replicas with a real policy (module docstring)."""

    def __init__(self, loop: EventLoop, policy: str, params: dict[str, Any], model: str, *,
                 poll_interval_s: float, hold_timeout_s: float, chunk_tokens: int,
                 prefix_capacity: int, reject: Callable[[SimRequest, str], None]) -> None:
        self.loop = loop
        self.policy = make_policy(policy, **params)
        self.model = model
        self.poll_interval_s = poll_interval_s
        self.hold_timeout_s = hold_timeout_s
        self.chunk_tokens = chunk_tokens
        self.prefix_capacity = prefix_capacity
        self.reject = reject
        self.demand: DemandTracker | None = None
        if policy == "length_bucket":
            self.demand = DemandTracker(getattr(self.policy, "threshold_tokens", 1024))
        self.endpoints: dict[str, _Endpoint] = {}
        # Routable endpoints in snapshot order, their cached router states, the order in
        # which their reports go stale, and those whose state must be rebuilt.
        self._routable: list[_Endpoint] = []
        self._states: list[ReplicaState] = []
        self._by_age: deque[_Endpoint] = deque()
        self._dirty: list[_Endpoint] = []
        self.held: deque[SimRequest] = deque()
        self._seq = 0

    # -- membership -----------------------------------------------------------------------
    def add(self, replica: SimReplica, now: float) -> None:
        """A replica became ready: route to it from now on."""
        ep = _Endpoint(replica, self.prefix_capacity)
        self.endpoints[replica.replica_id] = ep
        self._refresh(ep, now)
        ep.state = self._state_of(ep, now)
        ep.index = len(self._routable)
        self._routable.append(ep)
        self._states.append(ep.state)
        self._by_age.append(ep)

    def remove(self, replica_ids: set[str]) -> None:
        """Replicas that are draining: no new requests."""
        self._routable = [ep for ep in self._routable if ep.url not in replica_ids]
        self._by_age = deque(ep for ep in self._by_age if ep.url not in replica_ids)
        self._dirty = [ep for ep in self._dirty if ep.url not in replica_ids]
        for i, ep in enumerate(self._routable):
            ep.index = i
        for url in replica_ids:
            ep = self.endpoints.get(url)
            if ep is not None:  # (a unit drained while starting never joined)
                ep.index = -1
        self._states = [ep.state for ep in self._routable]  # type: ignore[misc]

    def flush_held(self, now: float) -> None:
        """Dispatch what the activator held (a replica just became ready)."""
        held, self.held = self.held, deque()
        for req in held:
            self.route(req, now)

    # -- requests -------------------------------------------------------------------------
    def route_request(self, req: SimRequest, block_tokens: int | None) -> RouteRequest:
        """The RouteRequest of a trace request (prefix hashes from its hash ids)."""
        hashes: tuple[int, ...] = ()
        if req.hash_ids and block_tokens:
            chain = []
            h = 0
            for hid in req.hash_ids:
                h = zlib.crc32(hid.to_bytes(8, "little"), h)
                chain.append(h)
            hashes = tuple(chain[:req.prompt_tokens // block_tokens])
        return RouteRequest(model=self.model, prompt_tokens=req.prompt_tokens,
                            max_tokens=req.output_tokens, prefix_hashes=hashes,
                            prefix_chunk_tokens=self.chunk_tokens)

    def route(self, req: SimRequest, now: float, block_tokens: int | None = None) -> None:
        """Pick a replica with the policy and dispatch, or hold, or reject."""
        if not self._routable:
            # The activator holds it until a replica is ready or hold_timeout_s passes.
            self.held.append(req)
            self.loop.at(req.arrival_s + self.hold_timeout_s, self._hold_expired, req)
            return
        rr = self.route_request(req, block_tokens)
        poll = self.poll_interval_s
        by_age = self._by_age
        while now - by_age[0].report_at >= poll:
            ep = by_age.popleft()
            self._refresh(ep, now)
            by_age.append(ep)
        states = self._states
        if self._dirty:
            for ep in self._dirty:
                if ep.dirty:
                    ep.state = self._state_of(ep, now)
                    ep.dirty = False
                    states[ep.index] = ep.state
            self._dirty.clear()
        if rr.prefix_hashes:
            states = list(states)
            for ep in self._routable:
                m = ep.prefix.match(rr.prefix_hashes)
                if m:
                    states[ep.index] = replace(states[ep.index],
                                               prefix_match_tokens=m * self.chunk_tokens)
        demand = self.demand.current(now) if self.demand is not None else _NO_DEMAND
        snap = _new_snapshot(tuple(states), self._seq, demand)
        self._seq += 1
        chosen = self.policy.pick(rr, snap)
        if chosen is None:
            self.reject(req, "rejected")
            return
        if self.demand is not None:
            self.demand.observe(rr, now)
        ep = self.endpoints[chosen.url]
        ep.in_flight += 1
        ep.pending.append(req.prompt_tokens)
        ep.pending_tokens += req.prompt_tokens
        ep.prefix.insert(rr.prefix_hashes, now)
        self._touch(ep)
        req.dispatched_s = now
        ep.replica.submit(req, now)

    def finished(self, replica_id: str, now: float) -> None:
        """A request on ``replica_id`` completed."""
        ep = self.endpoints.get(replica_id)
        if ep is not None:
            ep.in_flight -= 1
            ep.finishes.append(now)
            self._touch(ep)

    def _hold_expired(self, req: SimRequest) -> None:
        if req.status == "pending" and req.dispatched_s < 0 and req in self.held:
            self.held.remove(req)
            self.reject(req, "timeout")

    def _refresh(self, ep: _Endpoint, now: float) -> None:
        """Read the replica's /load now (the gateway's poll)."""
        ep.report = report = ep.replica.load_report(now)
        ep.report_at = now
        ep.pending.clear()
        ep.pending_tokens = 0
        if report.total_kv_blocks > 0:
            capacity = report.total_kv_blocks * report.block_size // self.chunk_tokens
            if capacity != ep.prefix.capacity:  # (the index never holds more than capacity)
                ep.prefix.resize(capacity)
        self._touch(ep)

    def _touch(self, ep: _Endpoint) -> None:
        if not ep.dirty and ep.index >= 0:
            ep.dirty = True
            self._dirty.append(ep)

    @staticmethod
    def _state_of(ep: _Endpoint, now: float) -> ReplicaState:
        f = ep.finishes
        cutoff = now - _COMPLETION_WINDOW_S
        while f and f[0] < cutoff:
            f.popleft()
        load = ep.report
        assert load is not None
        # (the fields in the order named at _new_route_state)
        return _new_route_state(ep.url, True, ep.in_flight, load.running, load.waiting,
                                load.kv_usage, load, len(ep.pending), ep.pending_tokens, 0,
                                len(f) / _COMPLETION_WINDOW_S if f else 0.0, _ANY_MODEL)
