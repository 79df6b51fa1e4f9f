from __future__ import annotations

import math

import pytest

from strata.routing.resource_match import (
    Estimate,
    Rates,
    ResourceMatch,
    estimate,
    fleet_rates,
    measured_rates,
)
from strata.routing.types import ReplicaState, RouteRequest, Snapshot

from .helpers import replica, report, request

RM = ResourceMatch()


def pick(*rs: ReplicaState, req=None, seq: int = 0) -> str | None:
    chosen = RM.pick(req or request(), Snapshot(tuple(rs), seq))
    return chosen.url if chosen else None


def test_prefers_the_replica_with_less_prefill_queued() -> None:
    a = replica("a", report(waiting=2, waiting_prompt_tokens=4000))
    b = replica("b", report(waiting=1, waiting_prompt_tokens=500))
    assert pick(a, b) == "b"


def test_counts_requests_dispatched_since_the_report() -> None:
    a = replica("a", report(), pending_requests=3, pending_prompt_tokens=3000)
    b = replica("b", report(waiting_prompt_tokens=1000))
    assert pick(a, b) == "b"


def test_uses_each_replicas_own_measured_rates() -> None:
    # Same queue; b prefills 4x faster (say, a bigger GPU): b wins despite more tokens queued.
    a = replica("a", report(waiting_prompt_tokens=1000, prefill_token_s=4e-4))
    b = replica("b", report(waiting_prompt_tokens=2000, prefill_token_s=1e-4))
    assert pick(a, b) == "b"
    # Without prefill_token_s the prompt rate is used.
    c = replica("c", report(waiting_prompt_tokens=1000, prefill_token_s=0.0,
                            prompt_tokens_per_s=100_000.0))
    assert pick(a, c) == "c"


def test_expected_prefix_hit_attracts_the_request() -> None:
    req = request(prompt_tokens=3000)
    a = replica("a", report(waiting_prompt_tokens=500))
    b = replica("b", report(waiting_prompt_tokens=500), prefix_match_tokens=2800)
    assert pick(a, b, req=req) == "b"
    # b's queue is 4,500 tokens longer, more than the 2,800 it saves this request, but
    # a would recompute them: the cache term (4 x 2,800 tokens) keeps the request on b.
    b2 = replica("b", report(waiting_prompt_tokens=5000), prefix_match_tokens=2800)
    assert pick(a, b2, req=req) == "b"
    # With cache_weight 0 the choice is the TTFT's alone: a.
    ttft_only = ResourceMatch(cache_weight=0.0)
    assert ttft_only.pick(req, Snapshot((a, b2))).url == "a"
    # And a queue longer than the saving plus the term (500 + 5 x 2,800) sends it to a.
    b3 = replica("b", report(waiting_prompt_tokens=15_000), prefix_match_tokens=2800)
    assert pick(a, b3, req=req) == "a"


def test_a_full_replica_holding_the_prefix_charges_no_one() -> None:
    # b holds the prefix but every sequence slot is taken: the request would wait there for
    # a slot (its TTFT counts that), so the others are not charged for not being b, and the
    # request goes where it starts now, as the TTFT-only choice would send it.
    req = request(prompt_tokens=3000)
    a = replica("a", report())
    b = replica("b", report(running=64, slot_free_tokens=400), prefix_match_tokens=2800,
                completions_per_s=2.0)
    ests = RM.estimates(req, Snapshot((a, b)))
    assert [e.cost_s for e in ests] == [e.ttft_s for e in ests]
    assert pick(a, b, req=req) == ResourceMatch(cache_weight=0.0).pick(
        req, Snapshot((a, b))).url == "a"
    # With a slot free on b again, the term is back: a pays for the 2,800 tokens b holds.
    b_free = replica("b", report(running=63), prefix_match_tokens=2800)
    a_cost, b_cost = (e.cost_s for e in RM.estimates(req, Snapshot((a, b_free))))
    assert pick(a, b_free, req=req) == "b" and a_cost > b_cost


def test_the_cache_term_is_zero_when_no_replica_or_every_replica_holds_the_prefix() -> None:
    # Nothing cached anywhere, or the same hit everywhere: cost equals TTFT, so the choice
    # is the TTFT-only policy's (a load-only workload routes exactly as before).
    req = request(prompt_tokens=3000)
    for hit in (0, 2000):
        a = replica("a", report(waiting_prompt_tokens=2000), prefix_match_tokens=hit)
        b = replica("b", report(waiting_prompt_tokens=500), prefix_match_tokens=hit)
        ests = RM.estimates(req, Snapshot((a, b)))
        assert [e.cost_s for e in ests] == [e.ttft_s for e in ests]
        assert pick(a, b, req=req) == "b"


def test_running_decodes_slow_chunked_prefill() -> None:
    # Equal prefill queues; a's budget per step is eaten by 2000 running decodes.
    a = replica("a", report(running=2000, max_num_seqs=4096, max_num_batched_tokens=2048,
                            waiting_prompt_tokens=1000))
    b = replica("b", report(running=10, waiting_prompt_tokens=1000))
    est_a = estimate(request(), a, fleet_rates((a, b)))
    est_b = estimate(request(), b, fleet_rates((a, b)))
    assert est_a.ttft_s > est_b.ttft_s
    assert pick(a, b) == "b"


def test_full_sequence_slots_add_a_wait_from_the_completion_rate() -> None:
    full = report(running=64, max_num_seqs=64)
    a = replica("a", full, completions_per_s=2.0)
    e = estimate(request(), a, fleet_rates((a,)))
    # One slot ahead to free, at 2 completions/s: at least 0.5 s.
    assert e.ttft_s >= 0.5
    b = replica("b", report(running=60, waiting_prompt_tokens=3000))
    assert pick(a, b) == "b"


def test_a_full_replica_waits_as_long_as_its_running_sequences_say() -> None:
    """Without a completion rate, the replica's own slot bound sets the wait, not the request's."""
    req = request(prompt_tokens=3000, max_tokens=1)
    long_runs = replica("a", report(running=64, max_num_seqs=64, slot_free_tokens=400),
                        prefix_match_tokens=2800)
    idle = replica("b", report())
    # 400 decode steps of 20 ms outweigh the prefill the cached prefix would save.
    assert pick(long_runs, idle, req=req) == "b"
    ending = replica("a", report(running=64, max_num_seqs=64, slot_free_tokens=2),
                     prefix_match_tokens=2800)
    assert pick(ending, idle, req=req) == "a"
    # Without the bound the request's own max_tokens stands in (the older estimate).
    unknown = replica("a", report(running=64, max_num_seqs=64), prefix_match_tokens=2800)
    assert pick(unknown, idle, req=req) == "a"


def test_rejects_replicas_whose_kv_cannot_hold_the_request() -> None:
    req = request(prompt_tokens=1600, max_tokens=800)  # 150 blocks of 16
    tight = replica("tight", report(free_kv_blocks=100))  # idle, but no room now
    roomy = replica("roomy", report(waiting_prompt_tokens=3000, free_kv_blocks=900))
    assert pick(tight, roomy, req=req) == "roomy"
    # Queued prompt tokens will claim blocks first.
    claimed = replica("claimed", report(free_kv_blocks=200, waiting_prompt_tokens=1600))
    assert pick(claimed, roomy, req=req) == "roomy"


def test_queues_for_memory_when_nothing_fits_now_and_rejects_too_large() -> None:
    req = request(prompt_tokens=1600, max_tokens=800)
    a = replica("a", report(free_kv_blocks=10, waiting_prompt_tokens=100))
    b = replica("b", report(free_kv_blocks=20, waiting_prompt_tokens=900))
    assert pick(a, b, req=req) == "a"  # both must wait for memory: the shorter queue
    huge = request(prompt_tokens=16 * 1000, max_tokens=100)  # larger than the whole cache
    assert pick(a, b, req=huge) is None


def test_unmeasured_replicas_borrow_the_fleet_median() -> None:
    fresh = replica("fresh", report(prefill_token_s=0.0, prompt_tokens_per_s=0.0,
                                    waiting_prompt_tokens=100))
    busy = replica("busy", report(waiting_prompt_tokens=5000))
    assert fleet_rates((fresh, busy)).prefill_token_s == pytest.approx(1e-4)
    assert pick(fresh, busy) == "fresh"


def test_without_any_measurement_it_orders_by_queued_tokens() -> None:
    cold = dict(prefill_token_s=0.0, prompt_tokens_per_s=0.0, decode_step_s=0.0)
    a = replica("a", report(waiting_prompt_tokens=900, **cold))
    b = replica("b", report(waiting_prompt_tokens=90, **cold))
    assert fleet_rates((a, b)).prefill_token_s == 1.0
    assert pick(a, b) == "b"


def test_metrics_only_replicas_are_estimated_from_waiting_counts() -> None:
    strata_busy = replica("s", report(waiting=5, waiting_prompt_tokens=5000))
    vllm_idle = replica("v", waiting=0, running=1, kv_usage=0.3)
    vllm_busy = replica("w", waiting=9, running=20, kv_usage=0.3)
    assert pick(strata_busy, vllm_idle) == "v"
    assert pick(vllm_busy, vllm_idle) == "v"
    assert pick(replica("full", kv_usage=1.0), vllm_busy) == "w"


def test_ties_go_to_least_load_then_rotate() -> None:
    a = replica("a", report(), in_flight=2)
    b = replica("b", report(), in_flight=0)
    c = replica("c", report(), in_flight=0)
    assert {pick(a, b, c, seq=s) for s in range(6)} == {"b", "c"}


def test_skips_draining_replicas() -> None:
    a = replica("a", report(draining=True))
    b = replica("b", report(waiting_prompt_tokens=9000))
    assert pick(a, b) == "b"


def _reference_pick(policy: ResourceMatch, req, snap: Snapshot) -> ReplicaState | None:
    """The straightforward selection, as the module docstring states it: each replica's
    estimate written out plainly, plus the cache term against the best-cached replica that
    has a free sequence slot."""
    cands = snap.candidates(req)
    fallback = fleet_rates(cands)
    hits = [max(0, min(r.prefix_match_tokens, req.prompt_tokens - 1)) for r in cands]

    def slot_free(r: ReplicaState) -> bool:
        load = r.load
        return load is None or load.max_num_seqs <= 0 or (
            load.running + load.waiting + r.pending_requests < load.max_num_seqs)

    top = max((h for r, h in zip(cands, hits, strict=True) if slot_free(r)), default=0)
    ests = []
    for r, hit in zip(cands, hits, strict=True):
        e = _reference_estimate(req, r, fallback)
        if top and policy.cache_weight:
            p = (measured_rates(r) or fallback).prefill_token_s
            e = Estimate(r, e.ttft_s, e.fits_now, e.fits_ever,
                         cost_s=e.ttft_s + policy.cache_weight * max(0, top - hit) * p)
        ests.append(e)
    assert ests == policy.estimates(req, snap)
    pool = [e for e in ests if e.fits_now] or [e for e in ests if e.fits_ever]
    if not pool:
        return None
    best = min(e.cost_s for e in pool)
    limit = best * (1.0 + policy.tie_tolerance) + 1e-9
    near = [e.replica for e in pool if e.cost_s <= limit]
    least = min(r.load_score for r in near)
    ties = [r for r in near if r.load_score == least]
    return ties[snap.seq % len(ties)]


def _reference_estimate(req: RouteRequest, r: ReplicaState, fallback: Rates) -> Estimate:
    """The module docstring's estimate, written out plainly for one replica."""
    load = r.load
    rates = measured_rates(r) or fallback
    hit = max(0, min(r.prefix_match_tokens, req.prompt_tokens - 1))
    new_tokens = req.prompt_tokens - hit
    if load is None:
        work = (r.waiting + r.pending_requests) * req.prompt_tokens + new_tokens
        ttft = work * rates.prefill_token_s + (rates.decode_step_s if r.running else 0.0)
        return Estimate(r, ttft, fits_now=r.kv_usage < 1.0, fits_ever=True, cost_s=ttft)
    queued = load.waiting_prompt_tokens + r.pending_prompt_tokens
    work = queued + new_tokens
    ttft = work * rates.prefill_token_s
    if load.running > 0:
        ttft += math.ceil(work / max(1, load.max_num_batched_tokens - load.running)) * (
            rates.decode_step_s)
    occupied = load.running + load.waiting + r.pending_requests
    if load.max_num_seqs > 0 and occupied >= load.max_num_seqs:
        position = occupied - load.max_num_seqs + 1
        if r.completions_per_s > 0:
            ttft += position / r.completions_per_s
        else:
            slot_tokens = load.slot_free_tokens or max(1, req.max_tokens)
            ttft += position * slot_tokens * rates.decode_step_s
    cost = ttft
    if load.block_size <= 0 or load.total_kv_blocks <= 0:
        return Estimate(r, ttft, fits_now=True, fits_ever=True, cost_s=cost)
    bs = load.block_size
    fits_now = math.ceil((new_tokens + req.max_tokens) / bs) <= (
        load.free_kv_blocks - math.ceil(queued / bs))
    fits_ever = fits_now or math.ceil(req.total_tokens / bs) <= load.total_kv_blocks
    return Estimate(r, ttft, fits_now=fits_now, fits_ever=fits_ever, cost_s=cost)


def _random_state(rng, i: int) -> ReplicaState:
    kind = rng.random()
    kw = dict(in_flight=rng.randrange(0, 12), pending_requests=rng.randrange(0, 4),
              pending_prompt_tokens=rng.choice((0, rng.randrange(0, 5000))),
              prefix_match_tokens=rng.choice((0, 0, rng.randrange(0, 4000))),
              completions_per_s=rng.choice((0.0, rng.uniform(0.1, 20.0))),
              healthy=rng.random() > 0.05,
              models=rng.choice((frozenset(), frozenset({"m"}), frozenset({"other"}))))
    if kind < 0.15:  # no strata report (vLLM and others)
        return ReplicaState(url=f"r{i}", running=rng.randrange(0, 5), waiting=rng.randrange(0, 5),
                            kv_usage=rng.choice((0.5, 1.0)), **kw)
    running = rng.randrange(0, 70)
    load = report(
        running=running, waiting=rng.randrange(0, 30),
        waiting_prompt_tokens=rng.choice((0, rng.randrange(0, 20000))),
        free_kv_blocks=rng.randrange(0, 1200), total_kv_blocks=rng.choice((0, 100, 1000, 1200)),
        block_size=rng.choice((0, 16, 32)), max_num_seqs=rng.choice((0, 8, 64)),
        max_num_batched_tokens=rng.choice((64, 512, 2048)),
        prompt_tokens_per_s=rng.choice((0.0, rng.uniform(100, 20000))),
        decode_step_s=rng.choice((0.0, rng.uniform(0.005, 0.05))),
        prefill_token_s=rng.choice((0.0, 0.0, rng.uniform(1e-5, 1e-3))),
        ready=rng.random() > 0.05, draining=rng.random() < 0.05,
        slot_free_tokens=rng.choice((0, rng.randrange(1, 2000))))
    return replica(f"r{i}", load, **kw)


@pytest.mark.parametrize("seed", range(4))
def test_estimate_equals_the_written_out_formula_on_random_replicas(seed: int) -> None:
    import random

    rng = random.Random(seed)
    fits = set()
    for i in range(400):
        r = _random_state(rng, i)
        req = RouteRequest(model="m", prompt_tokens=rng.choice((0, 1, rng.randrange(1, 6000))),
                           max_tokens=rng.choice((0, 1, rng.randrange(1, 2000))))
        fallback = rng.choice((fleet_rates(()), Rates(rng.uniform(1e-5, 1e-3), 0.02)))
        got, want = estimate(req, r, fallback), _reference_estimate(req, r, fallback)
        assert got == want  # the TTFT to the bit: the same arithmetic in the same order
        fits.add((got.fits_now, got.fits_ever))
    assert fits == {(True, True), (False, True), (False, False)}


@pytest.mark.parametrize("seed", range(8))
def test_pick_equals_the_straightforward_selection_on_random_fleets(seed: int) -> None:
    import random

    rng = random.Random(seed)
    policy = ResourceMatch(tie_tolerance=rng.choice((0.0, 0.05, 0.3)),
                           cache_weight=rng.choice((0.0, 1.0, 4.0)))
    states = [_random_state(rng, i) for i in range(rng.randrange(8, 40))]
    chosen: set[str] = set()
    for seq in range(300):
        # Like a gateway: most states carry over between decisions, some are replaced.
        for _ in range(rng.randrange(0, 4)):
            j = rng.randrange(len(states))
            states[j] = _random_state(rng, j)
        if rng.random() < 0.05:  # a replica joins or leaves: positions shift
            if rng.random() < 0.5 and len(states) > 1:
                states.pop(rng.randrange(len(states)))
            else:
                states.insert(rng.randrange(len(states) + 1), _random_state(rng, len(states)))
        req = RouteRequest(model=rng.choice(("m", "m", "other", "")),
                           prompt_tokens=rng.choice((0, 1, rng.randrange(1, 6000))),
                           max_tokens=rng.choice((0, 1, rng.randrange(1, 2000))))
        snap = Snapshot(tuple(states), seq)
        got = policy.pick(req, snap)
        assert got is _reference_pick(policy, req, snap)
        if got is not None:
            chosen.add(got.url)
    assert len(chosen) >= 3  # the fleets are varied enough to exercise the selection
