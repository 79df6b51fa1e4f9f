"""Per-stage replica sets: pinning by free KV then queue, draining, removal, errors."""

from __future__ import annotations

import pytest

from strata.stages.replicas import NoReplicaError, ReplicaSets


def sets() -> ReplicaSets:
    rs = ReplicaSets([(10, 20), (20, 30)], num_blocks=100)
    rs.add(0, "a:1", "http://a")
    rs.add(1, "b:1", "http://b")
    rs.add(1, "c:1", "http://c")
    return rs


def test_pin_picks_most_free_kv_then_shortest_queue() -> None:
    rs = sets()
    assert rs.pin(1, {"b:1": 10, "c:1": 40}) == ("a:1", "b:1")
    assert rs.pin(2, {"b:1": 60, "c:1": 40}) == ("a:1", "c:1")
    # Equal free KV: the replica with fewer pinned sequences wins (then the address).
    assert rs.pin(3, {"b:1": 50, "c:1": 50})[1] == "b:1"
    assert rs.pin(4, {"b:1": 50, "c:1": 50})[1] == "c:1"
    assert rs.path_of(2) == ("a:1", "c:1")


def test_draining_replica_keeps_its_sequences_and_leaves_when_empty() -> None:
    rs = sets()
    rs.pin(1, {"b:1": 0, "c:1": 50})
    rs.set_state("b:1", "draining")
    assert rs.pin(2, {"b:1": 0, "c:1": 50})[1] == "c:1"  # no new pins on a draining replica
    assert not rs.remove_if_drained("b:1")  # sequence 1 still has its KV there
    assert rs.unpin(1) == ("a:1", "b:1")
    assert rs.remove_if_drained("b:1") and "b:1" not in rs.replicas
    assert not rs.remove_if_drained("c:1")  # live replicas are never removed


def test_a_stage_without_live_replicas_refuses_new_sequences() -> None:
    rs = sets()
    assert rs.ready()
    rs.set_state("a:1", "down")
    assert not rs.ready()
    with pytest.raises(NoReplicaError, match="stage 10:20"):
        rs.pin(1, {})
    assert rs.path_of(1) is None
    rs.add(0, "a:1", "http://a")  # a lost replica may come back
    assert rs.ready()


def test_layers_must_be_a_stage_and_addresses_unique() -> None:
    rs = sets()
    assert rs.stage_index((20, 30)) == 1
    with pytest.raises(ValueError, match="10:20, 20:30"):
        rs.stage_index((15, 30))
    with pytest.raises(ValueError, match="already"):
        rs.add(1, "b:1", "http://b")
    with pytest.raises(ValueError):
        ReplicaSets([], num_blocks=1)


def test_views_report_each_replica() -> None:
    rs = sets()
    rs.pin(1, {})
    views = rs.views({"a:1": 3})
    assert [(v.stage, v.addr, v.pinned, v.used_kv_blocks) for v in views] == [
        ("10:20", "a:1", 1, 3), ("20:30", "b:1", 1, 0), ("20:30", "c:1", 0, 0)
    ]
