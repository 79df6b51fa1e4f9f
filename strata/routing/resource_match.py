"""resource_match, the default policy: send a request where its first token comes soonest.

For each replica it estimates this request's time to first token from the replica's own
load report and measured rates, drops replicas whose KV cache cannot hold it, and picks the
minimum (ties: least load, then rotation). The estimate, for a replica with report L:

- ``hit``    = expected prefix-cache tokens for this prompt (gateway's prefix index),
  at most prompt_tokens - 1 (the last token is always computed).
- ``work``   = L.waiting_prompt_tokens + tokens dispatched since the report (pending)
  + (prompt_tokens - hit): prefill tokens ahead of and including this request's.
- ``steps``  = ceil(work / max(1, L.max_num_batched_tokens - L.running)): engine steps
  chunked prefill needs while the running sequences keep decoding one token a step.
- ``ttft``   = work * prefill_token_s + steps * decode_step_s (when sequences are running)
  + ``slot_wait`` when every one of the L.max_num_seqs sequence slots is taken:
  queue position / completions_per_s (measured by the gateway), or, before any completion
  was seen, position * L.slot_free_tokens * decode_step_s (the running sequences' own
  bound, which every gateway reads alike), or position * max_tokens * decode_step_s when
  the replica does not report it.

``prefill_token_s`` is L.prefill_token_s, else 1 / L.prompt_tokens_per_s; a replica that has
measured nothing yet borrows the median of the replicas that have. If no replica has
measured anything, prefill_token_s = 1 and decode_step_s = 0: the estimate degenerates to
"fewest prefill tokens ahead", which still orders replicas correctly by queued work.
Replicas without a strata report (vLLM, other OpenAI servers) use the median rates and
assume each waiting request holds as many prompt tokens as this one.

The cache term: ``pick`` minimizes ``cost = ttft + cache_weight * (top - hit) *
prefill_token_s``, where ``top`` is the largest expected hit among the candidates. The TTFT
alone is myopic: a replica whose queue is a little shorter wins even when the request would
recompute thousands of tokens there that another replica holds, and that recomputation is
work every later request waits behind (near saturation, prefill work is throughput). The
term charges a replica for the prefill it does beyond the best-cached one that has a free
sequence slot; with nothing cached anywhere (or the same hit everywhere) it is zero and the
choice is the TTFT's alone. A full replica is no reference: the request would queue there for
a slot, which its TTFT already counts, and charging the others for not being it would pile a
hot prefix onto a replica that cannot take it (what prefix affinity does).
``cache_weight`` 4 (default) was chosen in the simulator (``benchmarks/routing_sim.py``):
multi-turn chat near saturation gains most of prefix affinity's benefit, a hot prefix
(cached everywhere after one miss each) is unaffected, and 0 restores the TTFT-only choice.

KV fit: the request needs ceil((prompt - hit + max_tokens) / block_size) new blocks; a
replica fits now when that many are free after the queued and pending prompt tokens claim
theirs. Replicas that fit now win over replicas that would queue for memory; a replica whose
whole cache is smaller than prompt + max_tokens is rejected outright.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import compress
from operator import attrgetter, is_not, itemgetter

from strata.load import LoadReport
from strata.routing.types import ReplicaState, RouteRequest, Snapshot


@dataclass(frozen=True, slots=True)
class Rates:
    """Per-replica service rates used by the estimate (seconds per prefill token and step)."""

    prefill_token_s: float
    decode_step_s: float


def measured_prefill_token_s(load: LoadReport) -> float | None:
    """Seconds per prefill token a replica measured: its own figure, else the inverse of
    its prefill rate; None when it has measured neither yet."""
    p = load.prefill_token_s
    if p <= 0 and load.prompt_tokens_per_s > 0:
        p = 1.0 / load.prompt_tokens_per_s
    return p if p > 0 else None


def measured_rates(r: ReplicaState) -> Rates | None:
    """The rates a replica measured itself, or None when it has not measured any yet."""
    load = r.load
    p = None if load is None else measured_prefill_token_s(load)
    if load is None or p is None:
        return None
    return Rates(prefill_token_s=p, decode_step_s=max(0.0, load.decode_step_s))


_UNIT_RATES = Rates(prefill_token_s=1.0, decode_step_s=0.0)


def _median(values: list[float]) -> float:
    values.sort()
    n = len(values)
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2


def fleet_rates(replicas: tuple[ReplicaState, ...]) -> Rates:
    """Median measured rates of the fleet; unit rates when nothing is measured."""
    known = [m for m in (measured_rates(r) for r in replicas) if m is not None]
    if not known:
        return _UNIT_RATES
    if len(known) == 1:
        return known[0]
    return Rates(prefill_token_s=_median([k.prefill_token_s for k in known]),
                 decode_step_s=_median([k.decode_step_s for k in known]))


def expected_hit_tokens(request: RouteRequest, r: ReplicaState) -> int:
    """Prompt tokens expected from the replica's prefix cache (never the whole prompt)."""
    return max(0, min(r.prefix_match_tokens, request.prompt_tokens - 1))


@dataclass(frozen=True, slots=True)
class Estimate:
    """One replica's estimate for one request."""

    replica: ReplicaState
    ttft_s: float
    fits_now: bool
    fits_ever: bool  # now, or once the queue ahead has released its blocks
    cost_s: float = 0.0  # what pick minimizes: ttft_s plus the cache term (module docstring)


class ReplicaTerms:
    """The parts of one replica's estimate that do not depend on the request.

    Computed once per replica state (``ResourceMatch`` keeps them while the gateway keeps
    the state); ``estimate`` adds the request's part. A replica without a strata report
    (vLLM and others) has ``queued_requests`` instead of a token count and no KV check.
    """

    __slots__ = ("state", "routable", "models", "load_score", "prefill_token_s",
                 "decode_step_s", "reported", "queued_requests", "running", "kv_full",
                 "queued_tokens", "step_budget", "slot_position", "completions_per_s",
                 "slot_free_tokens", "block_size", "free_blocks", "total_blocks",
                 "prefix_match_tokens")

    def __init__(self, r: ReplicaState) -> None:
        # r.routable and r.load_score, inlined: a gateway computes terms for every new
        # replica state.
        load = r.load
        self.state = r
        self.models = r.models
        score = r.running + r.waiting + r.pending_requests
        self.load_score = r.in_flight if r.in_flight > score else score
        self.prefix_match_tokens = r.prefix_match_tokens
        self.completions_per_s = r.completions_per_s
        if load is None:
            self.routable = r.healthy
            self.prefill_token_s = None  # the fleet's median stands in
            self.decode_step_s = 0.0
            self.reported = False
            # Requests queued (each assumed as long as this prompt), whether a decode step
            # is added, and whether the cache is full.
            self.queued_requests = r.waiting + r.pending_requests
            self.running = r.running > 0
            self.kv_full = r.kv_usage >= 1.0
            self.queued_tokens = self.step_budget = self.slot_position = 0
            self.slot_free_tokens = self.block_size = self.free_blocks = self.total_blocks = 0
            return
        self.routable = r.healthy and load.ready and not load.draining
        p = self.prefill_token_s = measured_prefill_token_s(load)  # None: as without a report
        self.decode_step_s = 0.0 if p is None else max(0.0, load.decode_step_s)
        self.reported = True
        self.queued_requests = 0
        self.running = self.kv_full = False
        # Prefill tokens ahead; the tokens a step can prefill beside the running sequences
        # (0: nothing running, no decode steps added); the queue position for a sequence
        # slot (0: a slot is free); the block size (0: no KV check) and the blocks free
        # once the queue has claimed its own.
        queued = self.queued_tokens = load.waiting_prompt_tokens + r.pending_prompt_tokens
        running = load.running
        self.step_budget = max(1, load.max_num_batched_tokens - running) if running > 0 else 0
        occupied = running + load.waiting + r.pending_requests
        self.slot_position = (occupied - load.max_num_seqs + 1
                              if load.max_num_seqs > 0 and occupied >= load.max_num_seqs else 0)
        self.slot_free_tokens = load.slot_free_tokens
        bs = load.block_size if load.block_size > 0 and load.total_kv_blocks > 0 else 0
        self.block_size = bs
        self.free_blocks = load.free_kv_blocks - math.ceil(queued / bs) if bs else 0
        self.total_blocks = load.total_kv_blocks

    def serves(self, model: str) -> bool:
        """Whether the replica is a candidate for a request for ``model``."""
        return self.routable and (not self.models or not model or model in self.models)


Pool = list[tuple[float, ReplicaTerms, float]]  # (cost, replica, estimated TTFT), snapshot order


def estimate_pools(candidates: list[ReplicaTerms], prompt_tokens: int, max_tokens: int,
                   fallback: Rates, cache_weight: float = 0.0) -> tuple[Pool, Pool, Pool]:
    """The estimate of the module docstring for one request on each candidate, by KV fit:
    the candidates that can hold it now, those that can once their queue has drained, and
    those whose whole cache is too small. Each entry's cost is its TTFT plus
    ``cache_weight`` times the prefill it does beyond the best-cached candidate's.

    ``fallback``: the rates of a candidate that has measured none. One loop over the
    candidates rather than a call per candidate: this runs for every request.
    """
    ceil = math.ceil
    now_pool: Pool = []
    ever_pool: Pool = []
    never_pool: Pool = []
    last = prompt_tokens - 1  # the last prompt token is always computed
    slot_tokens = max(1, max_tokens)
    total_tokens = prompt_tokens + max_tokens
    need_bs = need_total = 0  # need_total: ceil(total_tokens / need_bs), the whole request's blocks
    top = 0  # the largest expected hit among the candidates that have a free sequence slot
    if cache_weight and last > 0:
        top = min(last, max((t.prefix_match_tokens for t in candidates if not t.slot_position),
                            default=0))
    for t in candidates:
        p = t.prefill_token_s
        if p is None:
            p, d = fallback.prefill_token_s, fallback.decode_step_s
        else:
            d = t.decode_step_s
        new_tokens = prompt_tokens
        hit = t.prefix_match_tokens
        if hit > 0 and last > 0:
            new_tokens -= hit if hit < last else last
        if not t.reported:
            work = t.queued_requests * prompt_tokens + new_tokens
            ttft = work * p + (d if t.running else 0.0)
            cost = ttft + cache_weight * max(0, top + new_tokens - prompt_tokens) * p if top else ttft
            (ever_pool if t.kv_full else now_pool).append((cost, t, ttft))
            continue
        work = t.queued_tokens + new_tokens
        ttft = work * p
        if t.step_budget:
            ttft += ceil(work / t.step_budget) * d
        if t.slot_position:
            if t.completions_per_s > 0:
                ttft += t.slot_position / t.completions_per_s
            else:
                ttft += t.slot_position * (t.slot_free_tokens or slot_tokens) * d
        cost = ttft + cache_weight * max(0, top + new_tokens - prompt_tokens) * p if top else ttft
        bs = t.block_size
        if not bs:
            now_pool.append((cost, t, ttft))
            continue
        if bs != need_bs:  # a fleet shares one block size: divide once per request
            need_bs = bs
            need_total = ceil(total_tokens / bs)
        need = need_total if new_tokens == prompt_tokens else ceil((new_tokens + max_tokens) / bs)
        if need <= t.free_blocks:
            now_pool.append((cost, t, ttft))
        elif need_total <= t.total_blocks:
            ever_pool.append((cost, t, ttft))
        else:
            never_pool.append((cost, t, ttft))
    return now_pool, ever_pool, never_pool


def estimate(request: RouteRequest, r: ReplicaState, fallback: Rates) -> Estimate:
    """Estimate this request's TTFT on replica ``r`` and whether its KV cache can hold it
    (alone, so its cost is its TTFT; ``ResourceMatch.estimates`` compares a fleet)."""
    now, ever, never = estimate_pools(
        [ReplicaTerms(r)], request.prompt_tokens, request.max_tokens, fallback)
    cost, _, ttft = (now or ever or never)[0]
    return Estimate(r, ttft, fits_now=bool(now), fits_ever=bool(now or ever), cost_s=cost)


class _TermsCache:
    """The terms of the last snapshot's states by position, and which are candidates.

    The snapshot's states are frozen and kept alive here, so the same object at a
    position means the same state: only positions holding a new object are recomputed,
    found by a comparison that runs in C, as is the candidate filter.
    """

    __slots__ = ("states", "terms", "model", "flags")

    def __init__(self) -> None:
        self.states: tuple[ReplicaState, ...] = ()
        self.terms: list[ReplicaTerms] = []
        self.model: str | None = None
        # For ``model``: 0 not a candidate, 1 a candidate with measured rates, 2 one without.
        self.flags: list[int] = []

    def candidates(self, states: tuple[ReplicaState, ...],
                   model: str) -> tuple[list[ReplicaTerms], bool]:
        """The candidates' terms for a request for ``model`` in snapshot order, and whether
        any of them lacks measured rates."""
        terms = self.terms
        n = len(states)
        changed: list[int] | None = None
        if len(self.states) == n:
            changed = list(compress(range(n), map(is_not, states, self.states)))
            for i in changed:
                terms[i] = ReplicaTerms(states[i])
        else:
            terms = self.terms = [ReplicaTerms(r) for r in states]
        self.states = states
        flags = self.flags
        if changed is None or model != self.model:
            self.model = model
            flags = self.flags = [_flag(t, model) for t in terms]
        else:
            for i in changed:
                flags[i] = _flag(terms[i], model)
        return list(compress(terms, flags)), 2 in flags


def _flag(t: ReplicaTerms, model: str) -> int:
    if not t.serves(model):
        return 0
    return 2 if t.prefill_token_s is None else 1


_load_score = attrgetter("load_score")
_cost = itemgetter(0)  # of a (cost, terms, ttft) entry


class ResourceMatch:
    """Minimum cost (estimated TTFT plus the cache term) among replicas that can hold the
    request (module docstring).

    Costs within ``tie_tolerance`` (relative) of the best count as equal, and equal
    replicas are ordered by load_score, so an idle fleet still spreads requests.

    The decision depends only on the request and the snapshot. ``pick`` keeps each
    replica state's ``ReplicaTerms`` while the snapshot keeps the state, so a gateway that
    keeps a replica's state until it changes pays only the per-request arithmetic.
    """

    __slots__ = ("tie_tolerance", "cache_weight", "name", "_cache")

    def __init__(self, tie_tolerance: float = 0.05, cache_weight: float = 4.0,
                 name: str = "resource_match") -> None:
        if not 0.0 <= tie_tolerance < 1.0:
            raise ValueError("resource_match tie_tolerance must be in [0, 1)")
        if cache_weight < 0.0:
            raise ValueError("resource_match cache_weight must be >= 0")
        self.tie_tolerance = tie_tolerance
        self.cache_weight = cache_weight
        self.name = name
        self._cache = _TermsCache()

    def __repr__(self) -> str:
        return (f"ResourceMatch(tie_tolerance={self.tie_tolerance!r}, "
                f"cache_weight={self.cache_weight!r}, name={self.name!r})")

    def estimates(self, request: RouteRequest, snapshot: Snapshot) -> list[Estimate]:
        """Estimates for every candidate replica (for metrics, debugging and tests)."""
        cands = snapshot.candidates(request)
        fallback = fleet_rates(cands)
        pools = estimate_pools([ReplicaTerms(r) for r in cands], request.prompt_tokens,
                               request.max_tokens, fallback, self.cache_weight)
        out = {id(t.state): Estimate(t.state, ttft, fits_now=k == 0, fits_ever=k < 2,
                                     cost_s=cost)
               for k, pool in enumerate(pools) for cost, t, ttft in pool}
        return [out[id(r)] for r in cands]

    def pick(self, request: RouteRequest, snapshot: Snapshot) -> ReplicaState | None:
        """The replica with the lowest cost that fits, else None.

        pool = the candidates that fit now, else those that fit ever; best = min cost over
        pool; near = pool within tie_tolerance of best (in snapshot order); among near, the
        least load_score; ties rotate by snapshot.seq.
        """
        cands, unmeasured = self._cache.candidates(snapshot.replicas, request.model)
        if not cands:
            return None
        fallback = fleet_rates(tuple(t.state for t in cands)) if unmeasured else _UNIT_RATES
        now_pool, ever_pool, _ = estimate_pools(cands, request.prompt_tokens,
                                                request.max_tokens, fallback,
                                                self.cache_weight)
        pool = now_pool or ever_pool
        if not pool:
            return None
        best = min(map(_cost, pool))
        limit = best * (1.0 + self.tie_tolerance) + 1e-9
        near = [e[1] for e in pool if e[0] <= limit]
        least = min(map(_load_score, near))
        ties = [t.state for t in near if t.load_score == least]
        return ties[snapshot.seq % len(ties)]
