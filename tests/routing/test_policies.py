from __future__ import annotations

from collections import Counter

import pytest

from strata.routing.policies import (
    LeastKV,
    LeastRequests,
    LengthBucket,
    PrefixAffinity,
    RoundRobin,
    rendezvous_order,
)
from strata.routing.registry import make_policy, policy_names
from strata.routing.types import Demand, ReplicaState, Snapshot

from .helpers import replica, report, request


def snap(*replicas: ReplicaState, seq: int = 0, demand: Demand | None = None) -> Snapshot:
    return Snapshot(tuple(replicas), seq, demand or Demand())


def test_round_robin_cycles_over_routable_replicas() -> None:
    rs = (replica("a"), replica("b", healthy=False), replica("c"))
    picks = [RoundRobin().pick(request(), snap(*rs, seq=i)).url for i in range(4)]
    assert picks == ["a", "c", "a", "c"]


def test_every_policy_returns_none_without_candidates() -> None:
    dead = snap(replica("a", healthy=False))
    for name in policy_names():
        assert make_policy(name).pick(request(), dead) is None
        assert make_policy(name).pick(request(), snap()) is None


def test_every_policy_respects_the_model() -> None:
    rs = snap(replica("a", models=frozenset({"x"})), replica("b", models=frozenset({"m"})))
    for name in policy_names():
        for seq in range(3):
            s = Snapshot(rs.replicas, seq)
            assert make_policy(name).pick(request(), s).url == "b", name


def test_least_requests_prefers_fewest_and_rotates_ties() -> None:
    rs = (replica("a", in_flight=3), replica("b", in_flight=1), replica("c", in_flight=1))
    picks = {LeastRequests().pick(request(), snap(*rs, seq=i)).url for i in range(4)}
    assert picks == {"b", "c"}
    # The replica's own report counts too (traffic from other gateways).
    rs2 = (replica("a", in_flight=0, running=4), replica("b", in_flight=1))
    assert LeastRequests().pick(request(), snap(*rs2)).url == "b"


def test_least_kv_counts_pending_prompt_tokens() -> None:
    a = replica("a", report(free_kv_blocks=600))  # 40% used
    b = replica("b", report(free_kv_blocks=700), pending_prompt_tokens=16 * 200)  # 30% + 20%
    assert LeastKV().pick(request(), snap(a, b)).url == "a"
    c = replica("c", kv_usage=0.1)  # metrics-only replica (no report)
    assert LeastKV().pick(request(), snap(a, b, c)).url == "c"


def test_prefix_affinity_is_sticky_and_spreads_distinct_prefixes() -> None:
    rs = tuple(replica(f"http://r{i}") for i in range(4))
    pol = PrefixAffinity()
    chosen = Counter()
    for p in range(400):
        req = request(prefix_hashes=(p * 7919 + 1, p))
        first = pol.pick(req, snap(*rs, seq=0)).url
        assert all(pol.pick(req, snap(*rs, seq=s)).url == first for s in range(1, 4))
        chosen[first] += 1
    assert set(chosen) == {r.url for r in rs}
    assert min(chosen.values()) > 50  # roughly uniform (expected 100 each)


def test_prefix_affinity_keys_on_leading_chunks_only() -> None:
    rs = tuple(replica(f"http://r{i}") for i in range(8))
    pol = PrefixAffinity(key_chunks=2)
    base = pol.pick(request(prefix_hashes=(11, 22, 33)), snap(*rs)).url
    assert pol.pick(request(prefix_hashes=(11, 22, 99, 100)), snap(*rs)).url == base


def test_prefix_affinity_bounds_the_load_of_a_hot_prefix() -> None:
    rs = [replica(f"http://r{i}") for i in range(3)]
    pol = PrefixAffinity(load_factor=1.25)
    req = request(prefix_hashes=(42,))
    home = pol.pick(req, snap(*rs)).url
    # Pile the hot prefix's requests on; the bound must spill them, and stays respected.
    for _ in range(30):
        r = pol.pick(req, snap(*rs))
        rs = [ReplicaState(x.url, in_flight=x.in_flight + (x.url == r.url)) for x in rs]
        total = sum(x.in_flight for x in rs)
        assert max(x.in_flight for x in rs) <= -(-1.25 * total // 3) + 1
    loads = {x.url: x.in_flight for x in rs}
    order = [r.url for r in rendezvous_order(42, rs)]
    assert order[0] == home
    # Spill follows the prefix's rendezvous order: home and next fill to the bound first.
    assert loads[order[0]] >= loads[order[1]] >= loads[order[2]] >= 1
    assert loads[order[0]] <= 14


def test_prefix_affinity_without_prefix_goes_to_least_loaded() -> None:
    rs = (replica("a", in_flight=2), replica("b", in_flight=0))
    assert PrefixAffinity().pick(request(prefix_hashes=()), snap(*rs)).url == "b"


def test_rendezvous_moves_only_the_removed_replicas_keys() -> None:
    rs = [replica(f"http://r{i}") for i in range(5)]
    before = {k: rendezvous_order(k, rs)[0].url for k in range(300)}
    after = {k: rendezvous_order(k, rs[:-1])[0].url for k in range(300)}
    moved = [k for k in before if before[k] != after[k]]
    assert moved and all(before[k] == "http://r4" for k in moved)


def test_length_bucket_separates_short_and_long() -> None:
    rs = tuple(replica(f"http://r{i}") for i in range(4))
    pol = LengthBucket(threshold_tokens=1000)
    even = Demand(short_tokens=1.0, long_tokens=1.0)
    shorts = {pol.pick(request(100, 10), snap(*rs, seq=s, demand=even)).url for s in range(8)}
    longs = {pol.pick(request(5000, 10), snap(*rs, seq=s, demand=even)).url for s in range(8)}
    assert shorts == {"http://r0", "http://r1"}
    assert longs == {"http://r2", "http://r3"}


def test_length_bucket_resizes_groups_by_demand() -> None:
    rs = tuple(replica(f"http://r{i}") for i in range(4))
    pol = LengthBucket(threshold_tokens=1000)
    mostly_long = Demand(short_tokens=1.0, long_tokens=9.0)
    assert pol.long_group_size(snap(*rs, demand=mostly_long), 4) == 3
    longs = {pol.pick(request(5000, 10), snap(*rs, seq=s, demand=mostly_long)).url
             for s in range(9)}
    assert longs == {"http://r1", "http://r2", "http://r3"}
    all_short = Demand(short_tokens=5.0, long_tokens=0.0)
    assert pol.long_group_size(snap(*rs, demand=all_short), 4) == 1  # never empty
    assert pol.pick(request(5000, 10), snap(replica("solo"))).url == "solo"


def test_length_bucket_picks_least_loaded_in_group() -> None:
    rs = (replica("a", in_flight=3), replica("b", in_flight=1), replica("c"), replica("d"))
    assert LengthBucket().pick(request(10, 10), snap(*rs)).url == "b"


def test_registry_builds_with_params_and_rejects_unknown() -> None:
    assert policy_names()[0] == "resource_match"
    assert make_policy("prefix_affinity", load_factor=2.0).load_factor == 2.0
    with pytest.raises(ValueError, match="unknown routing policy 'nope'"):
        make_policy("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        make_policy("round_robin", load_factor=2.0)
    with pytest.raises(ValueError, match="load_factor"):
        make_policy("prefix_affinity", load_factor=0.5)
