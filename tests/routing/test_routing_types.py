from __future__ import annotations

import pytest

from strata.routing.types import ReplicaState, RouteRequest, Snapshot

from .helpers import replica, report, request


def test_routable_follows_health_ready_and_draining() -> None:
    assert replica("a").routable
    assert not replica("a", healthy=False).routable
    assert not replica("a", report(ready=False)).routable
    assert not replica("a", report(draining=True)).routable
    assert replica("a", report()).routable


def test_load_score_takes_the_larger_view() -> None:
    assert ReplicaState("a", in_flight=5, running=1, waiting=1).load_score == 5
    assert ReplicaState("a", in_flight=1, running=3, waiting=2, pending_requests=1).load_score == 6


def test_candidates_filter_by_model_and_health() -> None:
    snap = Snapshot((
        ReplicaState("a", models=frozenset({"m"})),
        ReplicaState("b", models=frozenset({"other"})),
        ReplicaState("c"),  # models unknown: accepts any
        ReplicaState("d", healthy=False),
    ))
    assert [r.url for r in snap.candidates(request())] == ["a", "c"]
    assert [r.url for r in snap.without({"a"}).candidates(request())] == ["c"]


def test_route_request_validates() -> None:
    with pytest.raises(ValueError, match="prompt_tokens"):
        RouteRequest(model="m", prompt_tokens=-1, max_tokens=1)
    with pytest.raises(ValueError, match="max_tokens"):
        RouteRequest(model="m", prompt_tokens=1, max_tokens=-1)
    assert request(10, 5).total_tokens == 15
