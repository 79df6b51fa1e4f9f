"""Synthetic arrivals have the asked mean rate and burstiness (seeded)."""

from __future__ import annotations

import numpy as np
import pytest

from strata.bench import arrivals


def _rate_and_cv(times: list[float]) -> tuple[float, float]:
    gaps = np.diff(times)
    return 1.0 / gaps.mean(), gaps.std() / gaps.mean()


def test_poisson_rate_and_cv() -> None:
    times = arrivals.poisson_arrivals(rate=20.0, n=20_000, seed=3)
    rate, cv = _rate_and_cv(times)
    assert times[0] == 0.0 and rate == pytest.approx(20.0, rel=0.03)
    assert cv == pytest.approx(1.0, abs=0.05)
    assert arrivals.poisson_arrivals(20.0, 100, seed=3) == times[:100]


@pytest.mark.parametrize("burstiness", [0.5, 3.0])
def test_gamma_cv_matches_burstiness(burstiness: float) -> None:
    rate, cv = _rate_and_cv(arrivals.gamma_arrivals(5.0, 20_000, burstiness, seed=7))
    assert rate == pytest.approx(5.0, rel=0.05)
    assert cv == pytest.approx(burstiness, rel=0.08)


def test_constant_arrivals_are_evenly_spaced() -> None:
    assert arrivals.constant_arrivals(4.0, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_synthetic_trace_and_validation() -> None:
    n = arrivals.count_for_duration(4.0, 10.0)
    trace = arrivals.synthetic_trace(arrivals.poisson_arrivals(4.0, n), 64, 8, "poisson 4/s")
    assert len(trace.records) == 40 and trace.records[5].input_tokens == 64
    with pytest.raises(ValueError, match="--rate"):
        arrivals.gamma_arrivals(0.0, 10)
    with pytest.raises(ValueError, match="burstiness"):
        arrivals.gamma_arrivals(1.0, 10, burstiness=0)
