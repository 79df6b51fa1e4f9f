"""The load-only and affinity routing policies: pure ``pick(request, snapshot)`` functions.

Every policy returns the chosen ReplicaState, or None when no replica can take the request
(none routable for its model). Ties are broken by rotating with ``snapshot.seq`` so equal
replicas share the load instead of the first one taking everything.
resource_match, the default, lives in its own module.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from strata.routing.types import ReplicaState, RouteRequest, Snapshot


class Policy(Protocol):
    """A routing policy: a name and a pure pick."""

    name: str

    def pick(self, request: RouteRequest, snapshot: Snapshot) -> ReplicaState | None:
        """Choose the replica for ``request``, or None when none can take it."""
        ...


def pick_min(
    candidates: Sequence[ReplicaState], key: Callable[[ReplicaState], object], seq: int
) -> ReplicaState | None:
    """The replica with the smallest key; among equals, the (seq mod ties)-th one."""
    if not candidates:
        return None
    keys = [key(r) for r in candidates]
    best = min(keys)  # type: ignore[type-var]
    ties = [r for r, k in zip(candidates, keys, strict=True) if k == best]
    return ties[seq % len(ties)]


@dataclass(frozen=True, slots=True)
class RoundRobin:
    """Each routable replica in turn; the baseline that knows nothing."""

    name: str = "round_robin"

    def pick(self, request: RouteRequest, snapshot: Snapshot) -> ReplicaState | None:
        """The (seq mod n)-th candidate."""
        cands = snapshot.candidates(request)
        return cands[snapshot.seq % len(cands)] if cands else None


@dataclass(frozen=True, slots=True)
class LeastRequests:
    """Fewest requests on the replica (gateway in-flight or replica-reported)."""

    name: str = "least_requests"

    def pick(self, request: RouteRequest, snapshot: Snapshot) -> ReplicaState | None:
        """The candidate with the smallest load_score."""
        return pick_min(snapshot.candidates(request), lambda r: r.load_score, snapshot.seq)


def kv_usage_after_pending(r: ReplicaState) -> float:
    """KV usage including what requests dispatched since the last report will claim."""
    load = r.load
    if load is None or load.total_kv_blocks <= 0 or load.block_size <= 0:
        return r.kv_usage
    pending_blocks = math.ceil(r.pending_prompt_tokens / load.block_size)
    used = load.total_kv_blocks - load.free_kv_blocks + pending_blocks
    return min(1.0, used / load.total_kv_blocks)


@dataclass(frozen=True, slots=True)
class LeastKV:
    """Lowest KV-cache usage, then fewest requests: memory is what an LLM replica runs out of."""

    name: str = "least_kv"

    def pick(self, request: RouteRequest, snapshot: Snapshot) -> ReplicaState | None:
        """The candidate with the lowest KV usage (pending included)."""
        return pick_min(snapshot.candidates(request),
                        lambda r: (round(kv_usage_after_pending(r), 3), r.load_score),
                        snapshot.seq)


def rendezvous_order(key: int, replicas: Sequence[ReplicaState]) -> list[ReplicaState]:
    """Replicas by descending highest-random-weight score for ``key``.

    Rendezvous hashing moves only the keys of a replica that leaves or joins, which keeps
    prefix caches warm while the replica set changes. CRC-32 keeps it stable across
    processes, so several gateways send one prefix to the same replica.
    """
    salt = key.to_bytes(8, "little", signed=False)
    return sorted(replicas, key=lambda r: zlib.crc32(r.url.encode(), zlib.crc32(salt)),
                  reverse=True)


@dataclass(frozen=True, slots=True)
class PrefixAffinity:
    """Same leading prompt chunks -> same replica, unless that replica is overloaded.

    The key is the chained hash of the first ``key_chunks`` prefix chunks (a shorter prompt
    uses all it has; a prompt shorter than one chunk has no affinity and goes to the least
    loaded replica). The load bound is consistent hashing with bounded loads (Mirrokni et
    al., 2018): a replica is skipped while its load_score exceeds
    ``ceil(load_factor * (total load + 1) / n)``, so one hot prefix spills to its next
    replicas in rendezvous order instead of overloading one.
    """

    key_chunks: int = 2
    load_factor: float = 1.25
    name: str = "prefix_affinity"

    def __post_init__(self) -> None:
        if self.key_chunks < 1:
            raise ValueError("prefix_affinity key_chunks must be >= 1")
        if self.load_factor < 1.0:
            raise ValueError("prefix_affinity load_factor must be >= 1.0 (1.25 is typical)")

    def pick(self, request: RouteRequest, snapshot: Snapshot) -> ReplicaState | None:
        """The first replica in the prefix's rendezvous order that is within the bound."""
        cands = snapshot.candidates(request)
        if not cands:
            return None
        if not request.prefix_hashes:
            return pick_min(cands, lambda r: r.load_score, snapshot.seq)
        key = request.prefix_hashes[min(self.key_chunks, len(request.prefix_hashes)) - 1]
        total = sum(r.load_score for r in cands)
        bound = math.ceil(self.load_factor * (total + 1) / len(cands))
        order = rendezvous_order(key, cands)
        for r in order:
            if r.load_score + 1 <= bound:
                return r
        return order[0]  # unreachable: some replica is always at or below the mean


@dataclass(frozen=True, slots=True)
class LengthBucket:
    """Short and long requests on separate replica groups, sized by recent demand.

    After BucketServe: mixing long prefills into a batch of short requests stalls the short
    ones, so requests whose prompt + max_tokens exceed ``threshold_tokens`` go to the long
    group. The long group gets round(n * long share of recent token demand) replicas,
    clamped to [1, n-1] (with one replica both groups are that replica). Groups are cut
    from the URL-sorted replica list so a resize moves only the replicas at the boundary.
    Within a group the least-loaded replica wins.
    """

    threshold_tokens: int = 1024
    name: str = "length_bucket"

    def __post_init__(self) -> None:
        if self.threshold_tokens < 1:
            raise ValueError("length_bucket threshold_tokens must be >= 1")

    def long_group_size(self, snapshot: Snapshot, n: int) -> int:
        """How many of ``n`` replicas serve long requests now."""
        if n <= 1:
            return n
        d = snapshot.demand
        total = d.short_tokens + d.long_tokens
        share = d.long_tokens / total if total > 0 else 0.5
        return min(n - 1, max(1, round(n * share)))

    def pick(self, request: RouteRequest, snapshot: Snapshot) -> ReplicaState | None:
        """The least-loaded replica of the request's length group."""
        cands = sorted(snapshot.candidates(request), key=lambda r: r.url)
        if len(cands) <= 1:
            return cands[0] if cands else None
        n_long = self.long_group_size(snapshot, len(cands))
        is_long = request.total_tokens > self.threshold_tokens
        group = cands[len(cands) - n_long:] if is_long else cands[:len(cands) - n_long]
        return pick_min(group, lambda r: r.load_score, snapshot.seq)
