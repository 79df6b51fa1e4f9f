"""Scale to zero and back: activation from zero and the idle wait before zero."""

from __future__ import annotations

import pytest

from strata.autoscale.types import TierState
from strata.autoscale.zero import ScaleToZeroGate
from tests.autoscale.autoscale_helpers import replica


def tier(current: int, **kw: object) -> TierState:
    reps = tuple(replica(f"r{i}", kv=0.0) for i in range(current))
    return TierState(tier="t", current_replicas=current, replicas=reps, **kw)  # type: ignore[arg-type]


def test_pending_requests_at_zero_ask_for_one_replica() -> None:
    gate = ScaleToZeroGate()
    desired, why = gate.apply(tier(0, pending_requests=1), 0, 0, 5, 0.0)
    assert desired == 1 and "activator" in why
    assert gate.apply(tier(0, pending_requests=1), 3, 0, 5, 0.0) == (3, "")  # more is fine
    assert gate.apply(tier(0), 0, 0, 5, 0.0) == (0, "")  # nothing pending: stay at zero


def test_zero_waits_for_the_grace_period_of_idleness() -> None:
    gate = ScaleToZeroGate(grace_s=30.0)
    assert gate.apply(tier(2), 0, 0, 5, 100.0)[0] == 1
    assert gate.apply(tier(1), 0, 0, 5, 129.0)[0] == 1
    desired, why = gate.apply(tier(1), 0, 0, 5, 130.0)
    assert desired == 0 and "scaling to zero" in why


def test_retention_longer_than_grace_wins() -> None:
    gate = ScaleToZeroGate(grace_s=30.0, retention_s=90.0)
    gate.apply(tier(1), 0, 0, 5, 0.0)
    assert gate.apply(tier(1), 0, 0, 5, 60.0)[0] == 1
    assert gate.apply(tier(1), 0, 0, 5, 90.0)[0] == 0


def test_traffic_resets_the_wait() -> None:
    gate = ScaleToZeroGate(grace_s=30.0)
    gate.apply(tier(1), 0, 0, 5, 0.0)
    desired, why = gate.apply(tier(1, in_flight_requests=2), 0, 0, 5, 20.0)
    assert desired == 1 and "2 request(s)" in why
    assert gate.apply(tier(1), 0, 0, 5, 40.0)[0] == 1  # idle again only since t=40
    assert gate.apply(tier(1), 0, 0, 5, 70.0)[0] == 0
    # A request that arrived (and finished) between two decisions also counts.
    gate.apply(tier(1), 0, 0, 5, 100.0)
    assert gate.apply(tier(1, last_request_at=120.0), 0, 0, 5, 140.0)[0] == 1
    assert gate.apply(tier(1, last_request_at=120.0), 0, 0, 5, 150.0)[0] == 0


def test_gate_is_inert_when_min_is_positive_or_desired_positive() -> None:
    gate = ScaleToZeroGate()
    assert gate.apply(tier(3), 0, 1, 5, 0.0) == (0, "")
    assert gate.apply(tier(3), 2, 0, 5, 0.0) == (2, "")


def test_negative_periods_are_rejected() -> None:
    with pytest.raises(ValueError, match="grace"):
        ScaleToZeroGate(grace_s=-1.0)
