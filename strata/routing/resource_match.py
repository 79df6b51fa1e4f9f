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

KV fit: the request needs ceil((prompt - hit + max_tokens) / block_size) new blocks; a
replica fits now when that many are free after the queued and pending prompt tokens claim
theirs. Replicas that fit now win over replicas that would queue for memory; a replica whose
whole cache is smaller than prompt + max_tokens is rejected outright.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import compress
from operator import is_not, itemgetter
from typing import Any

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
            slot_tokens = load.slot_free_tokens or max(1, request.max_tokens)
            ttft += position * slot_tokens * rates.decode_step_s

    if load.block_size <= 0 or load.total_kv_blocks <= 0:
        return Estimate(r, ttft, fits_now=True, fits_ever=True)
    bs = load.block_size
    need = math.ceil((new_tokens + request.max_tokens) / bs)
    free = load.free_kv_blocks - math.ceil(queued / bs)
    fits_ever = math.ceil(request.total_tokens / bs) <= load.total_kv_blocks
    return Estimate(r, ttft, fits_now=need <= free, fits_ever=fits_ever)


# Per-replica terms of the estimate that do not depend on the request, with the state they
# were computed from: (state, routable, models, prefill_token_s or None, decode_step_s,
# load_score, has_report, queued prompt tokens, step budget (0: nothing running), queue
# position for a sequence slot (0: a slot is free), completions/s, block size (0: no KV
# check), free blocks after the queue, total blocks, prefix_match_tokens, plain: measured
# rates, a KV check and no prefix match, the case pick takes a short path for, the
# replica's slot_free_tokens (0: the request's max_tokens stands in)).
_Terms = tuple[Any, ...]
_load_score = itemgetter(5)
_ttft = itemgetter(0)  # of a (ttft, terms) pair


def _terms(r: ReplicaState) -> _Terms:
    """The request-independent parts of ``estimate`` for ``r``, in the order pick reads them."""
    load = r.load
    # r.load_score and measured_rates(r), inlined.
    score = r.running + r.waiting + r.pending_requests
    if r.in_flight > score:
        score = r.in_flight
    if load is None:
        # No report: slot 7 counts queued requests (each assumed as long as this prompt),
        # slot 8 says whether a decode step is added, slot 9 whether the request fits now.
        return (r, r.healthy, r.models, None, None, score, False,
                r.waiting + r.pending_requests, bool(r.running), r.kv_usage < 1.0,
                0.0, 0, 0, 0, r.prefix_match_tokens, False, 0)
    p = load.prefill_token_s
    if p <= 0 and load.prompt_tokens_per_s > 0:
        p = 1.0 / load.prompt_tokens_per_s
    d = None
    if p <= 0:
        p = None
    else:
        d = max(0.0, load.decode_step_s)
    queued = load.waiting_prompt_tokens + r.pending_prompt_tokens
    running = load.running
    budget = max(1, load.max_num_batched_tokens - running) if running > 0 else 0
    occupied = running + load.waiting + r.pending_requests
    position = (occupied - load.max_num_seqs + 1
                if load.max_num_seqs > 0 and occupied >= load.max_num_seqs else 0)
    bs = load.block_size if load.block_size > 0 and load.total_kv_blocks > 0 else 0
    free = load.free_kv_blocks - math.ceil(queued / bs) if bs else 0
    return (r, r.healthy and load.ready and not load.draining, r.models, p, d, score, True,
            queued, budget, position, r.completions_per_s, bs, free, load.total_kv_blocks,
            r.prefix_match_tokens, p is not None and bs > 0 and r.prefix_match_tokens <= 0,
            load.slot_free_tokens)


def _flag(t: _Terms, model: str) -> int:
    """0: not a candidate for ``model``; 1: a candidate with measured rates; 2: one without."""
    if not (t[1] and (not t[2] or not model or model in t[2])):
        return 0
    return 2 if t[3] is None else 1


@dataclass(frozen=True, slots=True)
class ResourceMatch:
    """Minimum estimated TTFT among replicas that can hold the request (module docstring).

    Estimates within ``tie_tolerance`` (relative) of the best count as equal, and equal
    replicas are ordered by load_score, so an idle fleet still spreads requests.

    ``pick`` gives exactly the decision of ``estimates`` followed by the selection in its
    docstring, but computes each replica state's request-independent terms once and
    allocates no estimate objects: a gateway that keeps a replica's state until it changes
    pays only the per-request arithmetic. The terms are remembered by snapshot position
    together with the previous snapshot's states (frozen, and kept alive by that tuple, so
    identity means the same state); positions whose state is a different object are
    recomputed, found by a comparison that runs in C, as is the candidate filter.
    """

    tie_tolerance: float = 0.05
    name: str = "resource_match"
    # [states, their terms, candidate flags for the model below (0: not a candidate, 1: a
    # measured one, 2: one without rates), that model, how many flags are 2]
    _memo: list[Any] = field(default_factory=lambda: [(), [], [], None, 0], init=False,
                             repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.tie_tolerance < 1.0:
            raise ValueError("resource_match tie_tolerance must be in [0, 1)")

    def estimates(self, request: RouteRequest, snapshot: Snapshot) -> list[Estimate]:
        """Estimates for every candidate replica (for metrics, debugging and tests)."""
        cands = snapshot.candidates(request)
        fallback = fleet_rates(cands)
        return [estimate(request, r, fallback) for r in cands]

    def pick(self, request: RouteRequest, snapshot: Snapshot) -> ReplicaState | None:
        """The replica with the lowest estimated TTFT that fits, else None.

        Same result as: ests = estimates(); pool = those that fit now, else those that fit
        ever; best = min ttft over pool; near = pool within tie_tolerance of best (in
        snapshot order); among near, the least load_score; ties rotate by snapshot.seq.
        """
        memo = self._memo
        states = snapshot.replicas
        model = request.model
        old, terms, flags, flags_model, unmeasured = memo
        n = len(states)
        if len(old) == n:
            changed = list(compress(range(n), map(is_not, states, old)))
            for i in changed:
                terms[i] = _terms(states[i])
        else:
            terms = [_terms(r) for r in states]
            changed = None
        if changed is None or model != flags_model:
            flags = [_flag(t, model) for t in terms]
            unmeasured = flags.count(2)
        else:
            for i in changed:
                f = _flag(terms[i], model)
                unmeasured += (f == 2) - (flags[i] == 2)
                flags[i] = f
        memo[:] = (states, terms, flags, model, unmeasured)
        cands: list[_Terms] = list(compress(terms, flags))
        if not cands:
            return None
        fb_p = fb_d = 0.0
        if unmeasured:
            fallback = fleet_rates(tuple(t[0] for t in cands))
            fb_p, fb_d = fallback.prefill_token_s, fallback.decode_step_s
        prompt = request.prompt_tokens
        max_tokens = request.max_tokens
        last = prompt - 1
        slot_tokens = max(1, max_tokens)
        total_tokens = prompt + max_tokens
        ceil = math.ceil
        # Candidates that fit now, and (only needed when none does) those that fit ever,
        # each as (ttft, terms) in snapshot order.
        now_pool: list[tuple[float, _Terms]] = []
        ever_pool: list[tuple[float, _Terms]] = []
        need_bs = 0  # the block size whose ceil(total_tokens / bs) need_total holds
        need_total = 0
        for t in cands:
            if t[15]:  # the loop below for a plain replica, with its dead branches removed
                work = t[7] + prompt
                ttft = work * t[3]
                budget = t[8]
                if budget:
                    ttft += ceil(work / budget) * t[4]
                position = t[9]
                if position:
                    cps = t[10]
                    if cps > 0:
                        ttft += position / cps
                    else:
                        ttft += position * (t[16] or slot_tokens) * t[4]
                bs = t[11]
                if bs != need_bs:
                    need_bs = bs
                    need_total = ceil(total_tokens / bs)
                if need_total <= t[12]:
                    now_pool.append((ttft, t))
                elif need_total <= t[13]:
                    ever_pool.append((ttft, t))
                continue
            (_, _, _, p, d, _, has_load, queued, budget, position, cps, bs, free, total,
             pm, _, slot_free) = t
            if p is None:
                p, d = fb_p, fb_d
            if pm > 0:
                hit = pm if pm < last else last
                if hit < 0:
                    hit = 0
                new_tokens = prompt - hit
            else:
                new_tokens = prompt
            if not has_load:
                work = queued * prompt + new_tokens
                ttft = work * p + (d if budget else 0.0)
                (now_pool if position else ever_pool).append((ttft, t))
                continue
            work = queued + new_tokens
            ttft = work * p
            if budget:
                ttft += ceil(work / budget) * d
            if position:
                if cps > 0:
                    ttft += position / cps
                else:
                    ttft += position * (slot_free or slot_tokens) * d
            if not bs:
                now_pool.append((ttft, t))
                continue
            if bs != need_bs:
                need_bs = bs
                need_total = ceil(total_tokens / bs)
            need = need_total if new_tokens == prompt else ceil((new_tokens + max_tokens) / bs)
            if need <= free:
                now_pool.append((ttft, t))
            elif need_total <= total:
                ever_pool.append((ttft, t))
        pool = now_pool or ever_pool
        if not pool:
            return None
        # (min() over a map: the same comparisons as the loop it replaces, run in C)
        best = min(map(_ttft, pool))
        limit = best * (1.0 + self.tie_tolerance) + 1e-9
        near = [e[1] for e in pool if e[0] <= limit]
        least = min(map(_load_score, near))
        ties = [t[0] for t in near if t[5] == least]
        return ties[snapshot.seq % len(ties)]
