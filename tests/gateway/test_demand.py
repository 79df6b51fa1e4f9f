from __future__ import annotations

import math

import pytest

from strata.gateway.demand import DemandTracker
from strata.routing.types import RouteRequest


def req(tokens: int) -> RouteRequest:
    return RouteRequest(model="m", prompt_tokens=tokens, max_tokens=0)


def test_classifies_and_decays() -> None:
    d = DemandTracker(threshold_tokens=100, tau_s=10.0)
    d.observe(req(50), now=0.0)
    d.observe(req(500), now=0.0)
    now = d.current(0.0)
    assert (now.short_tokens, now.long_tokens) == (50, 500)
    later = d.current(10.0)
    assert later.long_tokens == pytest.approx(500 / math.e)
    assert later.short_tokens == pytest.approx(50 / math.e)


def test_rejects_bad_tau() -> None:
    with pytest.raises(ValueError):
        DemandTracker(10, tau_s=0)
