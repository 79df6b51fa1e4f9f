"""What a routing policy sees: one request and a snapshot of the replicas.

Both are frozen so a policy cannot mutate the gateway's state and so the simulator can
build them without a gateway. A snapshot is taken *for* one request: each replica's
``prefix_match_tokens`` is the gateway's estimate of how much of *this* prompt that
replica already holds in its prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.load import LoadReport


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """The facts about a request that routing uses, extracted once from its body."""

    model: str
    prompt_tokens: int  # estimate (see strata.routing.prompt for the bound)
    max_tokens: int
    # Chained hashes of the prompt's leading fixed-size chunks: prefix_hashes[i] identifies
    # the whole prefix up to the end of chunk i, so equal values mean equal prefixes.
    prefix_hashes: tuple[int, ...] = ()
    prefix_chunk_tokens: int = 64  # tokens (estimated) covered by one prefix chunk

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0:
            raise ValueError(f"RouteRequest.prompt_tokens must be >= 0, got {self.prompt_tokens}")
        if self.max_tokens < 0:
            raise ValueError(f"RouteRequest.max_tokens must be >= 0, got {self.max_tokens}")
        if self.prefix_chunk_tokens <= 0:
            raise ValueError("RouteRequest.prefix_chunk_tokens must be > 0")

    @property
    def total_tokens(self) -> int:
        """Prompt plus the most tokens it may generate: its worst-case KV footprint."""
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """One replica as the gateway knows it right now.

    ``running``/``waiting``/``kv_usage`` come from the replica's /load report, from its
    Prometheus metrics (vLLM and other OpenAI servers), or are 0 when neither exists;
    ``load`` is the full report only for strata replicas. The ``pending_*`` fields count
    requests the gateway dispatched after the latest report was requested, which that
    report therefore cannot include yet.
    """

    url: str
    healthy: bool = True
    in_flight: int = 0  # gateway's own count of requests sent and not yet finished
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # 0..1
    load: LoadReport | None = None
    pending_requests: int = 0
    pending_prompt_tokens: int = 0
    prefix_match_tokens: int = 0  # this request's prompt tokens expected in its prefix cache
    completions_per_s: float = 0.0  # requests finished per second, measured by the gateway
    models: frozenset[str] = frozenset()  # empty: not known yet, accept any model

    @property
    def routable(self) -> bool:
        """Healthy and neither loading nor draining, as far as the gateway knows."""
        if not self.healthy:
            return False
        return self.load is None or (self.load.ready and not self.load.draining)

    @property
    def load_score(self) -> int:
        """Requests on the replica: the larger of the gateway's and the replica's own count.

        The gateway's count is fresher; the replica's includes traffic from other gateways.
        """
        return max(self.in_flight, self.running + self.waiting + self.pending_requests)

    def serves(self, model: str) -> bool:
        """Whether this replica can take a request for ``model``."""
        return not self.models or not model or model in self.models


@dataclass(frozen=True, slots=True)
class Demand:
    """Recent demand by length class, in tokens of work, decayed by the gateway.

    length_bucket sizes its replica groups from this; zero everywhere means no history.
    """

    short_tokens: float = 0.0
    long_tokens: float = 0.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The replica set at one decision; ``seq`` increases by one per decision."""

    replicas: tuple[ReplicaState, ...]
    seq: int = 0
    demand: Demand = field(default_factory=Demand)

    def candidates(self, request: RouteRequest) -> tuple[ReplicaState, ...]:
        """Replicas that are routable and serve the request's model, in snapshot order."""
        return tuple(r for r in self.replicas if r.routable and r.serves(request.model))

    def without(self, urls: frozenset[str] | set[str]) -> Snapshot:
        """The same snapshot minus some replicas (those a retry already tried)."""
        return Snapshot(tuple(r for r in self.replicas if r.url not in urls), self.seq,
                        self.demand)
