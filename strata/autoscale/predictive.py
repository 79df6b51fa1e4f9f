"""Predictive autoscaling: provision for the demand expected when new replicas are ready.

A replica asked for now serves only after its start-up time (process start, weight load,
warm-up). This policy forecasts the arrival rate at ``now + startup`` (Holt's linear
trend, damped, over a sliding window, ``strata.autoscale.forecast``), where ``startup`` is a high
percentile of the tier's recently measured start-up durations, and converts it to
replicas with the per-replica capacity the LLM policy learns (tokens/s divided by the
tokens of a mean request, or a configured requests/s).

It trusts its forecast only while the forecast has been right: each forecast is scored
when its target time comes, and while the recent MAPE is above ``max_forecast_error``
(or too few forecasts were scored, or no capacity is known) the decision is the LLM
policy's, and the reason says so. When trusted, the proposal is the larger of the
forecast's and the LLM signals' (a forecast must not hide a present SLO violation). The
result then goes through the same behaviour, bounds and scale-to-zero steps as ``llm``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from strata.autoscale.forecast import ForecastErrors, HoltForecaster
from strata.autoscale.llm import LlmConfig, LlmPolicy, Recommendation
from strata.autoscale.types import TierState, percentile


class PredictiveConfig(LlmConfig):
    """``autoscaling: {policy: predictive, ...}``; every ``llm`` field applies to its fallback."""

    policy: Literal["predictive"] = "predictive"  # type: ignore[assignment]
    forecast_window_s: float = Field(default=600.0, gt=0.0)
    # Smoothing of the level and the trend. Slow enough that minute-scale bursts of a real
    # trace do not swing a forecast projected a start-up time ahead (0.5/0.3 made the
    # policy flap: 499 scale changes in the simulated day, docs/results.md), fast enough
    # to learn a sustained ramp within ~100 s of 5 s ticks.
    holt_alpha: float = Field(default=0.2, gt=0.0, le=1.0)
    holt_beta: float = Field(default=0.05, gt=0.0, le=1.0)
    # Optional damped trend: a forecast adds at most this many seconds of the current
    # slope (None: plain Holt). It trades ramp tracking for calm; off by default.
    trend_damping_s: float | None = Field(default=None, gt=0.0)
    default_startup_s: float = Field(default=30.0, ge=0.0)
    startup_percentile: float = Field(default=90.0, gt=0.0, le=100.0)
    max_forecast_error: float = Field(default=0.3, gt=0.0)  # MAPE above which to fall back
    error_window_s: float = Field(default=300.0, gt=0.0)
    min_scored_forecasts: int = Field(default=5, ge=1)
    error_floor_rps: float = Field(default=0.5, gt=0.0)
    capacity_rps_per_replica: float | None = Field(default=None, gt=0.0)


class PredictivePolicy(LlmPolicy):
    """Forecast-driven scaling ahead of demand, falling back to ``llm`` when it errs."""

    name = "predictive"

    def __init__(self, config: PredictiveConfig) -> None:
        super().__init__(config)
        self.config: PredictiveConfig = config
        self.forecaster = HoltForecaster(
            window_s=config.forecast_window_s, alpha=config.holt_alpha, beta=config.holt_beta,
            damping_s=config.trend_damping_s,
        )
        self.errors = ForecastErrors(window_s=config.error_window_s, floor=config.error_floor_rps)

    def startup_s(self, state: TierState) -> float:
        """How far ahead to provision: a high percentile of recent start-up durations."""
        measured = percentile(state.startup_s, self.config.startup_percentile)
        return self.config.default_startup_s if measured is None else measured

    def capacity_rps(self, state: TierState) -> float | None:
        """Requests per second one replica sustains, configured or from the learned tokens/s."""
        if self.config.capacity_rps_per_replica is not None:
            return self.config.capacity_rps_per_replica
        tokens = self.recommender.capacity.tokens_per_s
        if tokens is None or state.tokens_per_request <= 0:
            return None
        return tokens / state.tokens_per_request

    def _raw(self, state: TierState, now: float) -> Recommendation:
        cfg = self.config
        rate = state.arrival_rate_rps
        self.errors.score(now, rate)
        self.forecaster.observe(now, rate)
        llm = self.recommender.recommend(state, now, self.finish.tolerances)

        horizon = self.startup_s(state)
        fit = self.forecaster.fit()
        assert fit is not None
        forecast = fit.forecast(now + horizon)
        self.errors.expect(now + horizon, forecast)
        mape = self.errors.mape
        capacity = self.capacity_rps(state)

        metrics = dict(llm.metrics)
        metrics.update(
            {
                "arrival_rate_rps": rate,
                "forecast_rps": forecast,
                "forecast_horizon_s": horizon,
                "forecast_trend_rps_per_s": fit.trend,
                "forecast_scored": float(self.errors.count),
            }
        )
        if mape is not None:
            metrics["forecast_mape"] = mape
        if capacity is not None:
            metrics["capacity_rps_per_replica"] = capacity

        why_not = ""
        if self.errors.count < cfg.min_scored_forecasts:
            why_not = f"only {self.errors.count} forecast(s) scored (< {cfg.min_scored_forecasts})"
        elif mape is not None and mape > cfg.max_forecast_error:
            why_not = f"forecast MAPE {mape:.2f} > {cfg.max_forecast_error:.2f}"
        elif capacity is None:
            why_not = "no per-replica capacity known yet"
        if why_not:
            metrics["forecast_used"] = 0.0
            notes = [f"fallback to llm ({why_not})"]
            if llm.replicas is not None:
                notes.append(f"llm: {llm.signal} signal drives {llm.replicas} replica(s)")
            return Recommendation(llm.replicas, llm.signal, notes + llm.notes, metrics)

        assert capacity is not None
        # The epsilon keeps float noise (29.000000001) from asking for a replica too many.
        forecast_replicas = math.ceil(forecast / (capacity * cfg.target_utilization) - 1e-9)
        metrics["forecast.proposal"] = float(forecast_replicas)
        metrics["forecast_used"] = 1.0
        note = (
            f"forecast {forecast:.2f} req/s at +{horizon:.0f} s (MAPE {mape:.2f}) "
            f"needs {forecast_replicas} replica(s)"
        )
        if llm.replicas is not None and llm.replicas > forecast_replicas:
            return Recommendation(
                llm.replicas,
                llm.signal,
                [
                    f"llm {llm.signal} signal drives {llm.replicas} replica(s) over the forecast",
                    note,
                ],
                metrics,
            )
        return Recommendation(forecast_replicas, "forecast", [note], metrics)
