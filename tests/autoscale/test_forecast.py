"""Holt's linear-trend forecaster on a sliding window, and the forecast-error record."""

from __future__ import annotations

import pytest

from strata.autoscale.forecast import ForecastErrors, HoltForecaster


def test_linear_ramp_is_extrapolated() -> None:
    f = HoltForecaster(window_s=600, alpha=0.5, beta=0.3)
    for t in range(0, 300, 5):
        f.observe(float(t), 2.0 + 0.1 * t)
    fit = f.fit()
    assert fit is not None
    assert fit.trend == pytest.approx(0.1, rel=0.02)
    assert fit.forecast(295.0 + 60.0) == pytest.approx(2.0 + 0.1 * 355.0, rel=0.02)


def test_constant_series_has_no_trend() -> None:
    f = HoltForecaster()
    for t in range(0, 100, 2):
        f.observe(float(t), 7.0)
    fit = f.fit()
    assert fit is not None and fit.trend == pytest.approx(0.0)
    assert fit.forecast(1000.0) == pytest.approx(7.0)


def test_forecast_never_negative() -> None:
    f = HoltForecaster()
    for t in range(0, 60, 2):
        f.observe(float(t), 100.0 - t)  # falling 1 req/s per second
    fit = f.fit()
    assert fit is not None and fit.trend < 0
    assert fit.forecast(500.0) == 0.0  # extrapolation would be far below zero


def test_sliding_window_forgets_old_regimes() -> None:
    f = HoltForecaster(window_s=60)
    for t in range(0, 200, 2):
        f.observe(float(t), 100.0 if t < 100 else 5.0)
    assert len(f) == 31  # t in [138, 198]
    fit = f.fit()
    assert fit is not None and fit.level == pytest.approx(5.0)


def test_observations_must_move_forward() -> None:
    f = HoltForecaster()
    f.observe(10.0, 1.0)
    with pytest.raises(ValueError, match="back in time"):
        f.observe(9.0, 1.0)
    assert HoltForecaster().fit() is None


def test_errors_are_scored_when_forecasts_come_due() -> None:
    e = ForecastErrors(window_s=100, floor=1.0)
    e.expect(10.0, 8.0)
    e.expect(20.0, 30.0)
    e.score(5.0, 10.0)
    assert e.count == 0 and e.mape is None
    e.score(12.0, 10.0)  # |10 - 8| / 10
    assert e.mape == pytest.approx(0.2)
    e.score(20.0, 20.0)  # |20 - 30| / 20
    assert e.count == 2 and e.mape == pytest.approx(0.35)
    e.score(30.0, 0.0)
    e.expect(31.0, 2.0)
    e.score(31.0, 0.0)  # floor: |0 - 2| / max(0, 1) = 2
    assert e.count == 3 and e.mape == pytest.approx((0.2 + 0.5 + 2.0) / 3)
    e.score(130.5, 0.0)  # everything scored before t=30.5 left the window
    assert e.count == 1


def test_damped_trend_adds_at_most_tau_seconds_of_slope() -> None:
    plain = HoltForecaster(window_s=600, alpha=0.5, beta=0.3)
    damped = HoltForecaster(window_s=600, alpha=0.5, beta=0.3, damping_s=60.0)
    for k in range(121):
        t = 5.0 * k
        plain.observe(t, 2.0 + 0.05 * t)
        damped.observe(t, 2.0 + 0.05 * t)
    p, d = plain.fit(), damped.fit()
    assert p is not None and d is not None
    assert p.forecast(660.0) == pytest.approx(2.0 + 0.05 * 660.0, rel=0.01)
    assert d.forecast(660.0) < p.forecast(660.0)
    # However far ahead, a damped forecast adds no more than tau seconds of its trend.
    assert d.forecast(600.0 + 1e6) <= d.level + d.trend * 60.0 + 1e-9
    assert d.forecast(600.0) == pytest.approx(d.level)


def test_damping_must_be_positive() -> None:
    with pytest.raises(ValueError, match="damping"):
        HoltForecaster(damping_s=0.0)
