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
  was seen, position * max_tokens * decode_step_s.

``prefill_token_s`` is L.prefill_token_s, else 1 / L.prompt_tokens_per_s; a replica that has
measured nothing yet borrows the median of the replicas that have. If no replica has
measured anything, prefill_token_s = 1 and decode_step_s = 0: the estimate degenerates to
"fewest prefill tokens ahead", which still orders replicas correctly by queued work.
Replicas without a strata report (vLLM, other OpenAI servers) use the median rates and
assume each waiting request holds as many prompt tokens as this one.

KV fit: the request needs ceil((prompt - hit + max_tokens) / block_size) new blocks; a
replica fits now when that many are free after the queued and pending prompt tokens claim
theirs. Replicas that fit now win over replicas that would queue for memory; a replica whose
whole cache is smaller than prompt + max_tokens is rejected outright.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from strata.routing.types import ReplicaState, RouteRequest, Snapshot


@dataclass(frozen=True, slots=True)
class Rates:
    """Per-replica service rates used by the estimate (seconds per prefill token and step)."""

    prefill_token_s: float
    decode_step_s: float


def measured_rates(r: ReplicaState) -> Rates | None:
    """The rates a replica measured itself, or None when it has not measured any yet."""
    load = r.load
    if load is None:
        return None
    p = load.prefill_token_s
    if p <= 0 and load.prompt_tokens_per_s > 0:
        p = 1.0 / load.prompt_tokens_per_s
    if p <= 0:
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
    fits_ever: bool


def estimate(request: RouteRequest, r: ReplicaState, fallback: Rates) -> Estimate:
    """Estimate this request's TTFT on replica ``r`` and whether its KV cache can hold it."""
    load = r.load
    rates = measured_rates(r) or fallback
    hit = expected_hit_tokens(request, r)
    new_tokens = request.prompt_tokens - hit
    if load is None:
        queued = (r.waiting + r.pending_requests) * request.prompt_tokens
        work = queued + new_tokens
        ttft = work * rates.prefill_token_s + (rates.decode_step_s if r.running else 0.0)
        return Estimate(r, ttft, fits_now=r.kv_usage < 1.0, fits_ever=True)

    queued = load.waiting_prompt_tokens + r.pending_prompt_tokens
    work = queued + new_tokens
    ttft = work * rates.prefill_token_s
    if load.running > 0:
        budget = max(1, load.max_num_batched_tokens - load.running)
        ttft += math.ceil(work / budget) * rates.decode_step_s
    occupied = load.running + load.waiting + r.pending_requests
    if load.max_num_seqs > 0 and occupied >= load.max_num_seqs:
        position = occupied - load.max_num_seqs + 1
        if r.completions_per_s > 0:
            ttft += position / r.completions_per_s
        else:
            ttft += position * max(1, request.max_tokens) * rates.decode_step_s

    if load.block_size <= 0 or load.total_kv_blocks <= 0:
        return Estimate(r, ttft, fits_now=True, fits_ever=True)
    bs = load.block_size
    need = math.ceil((new_tokens + request.max_tokens) / bs)
    free = load.free_kv_blocks - math.ceil(queued / bs)
    fits_ever = math.ceil(request.total_tokens / bs) <= load.total_kv_blocks
    return Estimate(r, ttft, fits_now=need <= free, fits_ever=fits_ever)


@dataclass(frozen=True, slots=True)
class ResourceMatch:
    """Minimum estimated TTFT among replicas that can hold the request (module docstring).

    Estimates within ``tie_tolerance`` (relative) of the best count as equal, and equal
    replicas are ordered by load_score, so an idle fleet still spreads requests.
    """

    tie_tolerance: float = 0.05
    name: str = "resource_match"

    def __post_init__(self) -> None:
        if not 0.0 <= self.tie_tolerance < 1.0:
            raise ValueError("resource_match tie_tolerance must be in [0, 1)")

    def estimates(self, request: RouteRequest, snapshot: Snapshot) -> list[Estimate]:
        """Estimates for every candidate replica (for metrics, debugging and tests)."""
        cands = snapshot.candidates(request)
        fallback = fleet_rates(cands)
        return [estimate(request, r, fallback) for r in cands]

    def pick(self, request: RouteRequest, snapshot: Snapshot) -> ReplicaState | None:
        """The replica with the lowest estimated TTFT that fits, else None."""
        ests = self.estimates(request, snapshot)
        pool = [e for e in ests if e.fits_now] or [e for e in ests if e.fits_ever]
        if not pool:
            return None
        best = min(e.ttft_s for e in pool)
        limit = best * (1.0 + self.tie_tolerance) + 1e-9
        near = [e.replica for e in pool if e.ttft_s <= limit]
        least = min(r.load_score for r in near)
        ties = [r for r in near if r.load_score == least]
        return ties[snapshot.seq % len(ties)]
