"""Predictive policy: scales ahead of a ramp by the start-up time, falls back when wrong."""

from __future__ import annotations

import math
import random

from strata.autoscale.llm import LlmConfig, LlmPolicy
from strata.autoscale.predictive import PredictiveConfig, PredictivePolicy
from strata.autoscale.types import TierState
from tests.autoscale.autoscale_helpers import replica

TICK = 5.0
COMMON = {"max_replicas": 100, "target_utilization": 1.0}


def state(current: int, rate: float, **kw: object) -> TierState:
    reps = tuple(replica(f"r{i}", kv=0.3) for i in range(current))  # light load
    return TierState(
        tier="t",
        current_replicas=current,
        replicas=reps,
        arrival_rate_rps=rate,
        mean_prompt_tokens=300.0,
        mean_output_tokens=100.0,
        startup_s=(60.0,) * 5,
        **kw,  # type: ignore[arg-type]
    )


def test_scales_ahead_of_a_ramp_by_the_startup_time() -> None:
    p = PredictivePolicy(
        PredictiveConfig.model_validate({**COMMON, "capacity_rps_per_replica": 1.0})
    )
    reactive = LlmPolicy(LlmConfig.model_validate(COMMON))

    def rate(t: float) -> float:
        return 2.0 + 0.05 * t  # one more request per second every 20 s

    current = 2
    ahead = []
    t = 0.0
    while t <= 600.0:
        d = p.decide(state(current, rate(t)), t)
        r = reactive.decide(state(current, rate(t)), t)
        if t >= 450.0:
            ahead.append((t, d))
            assert r.desired < d.desired  # the LLM signals alone see no pressure yet
        current = d.desired
        t += TICK
    for t, d in ahead:
        assert d.metrics["forecast_used"] == 1.0 and d.reason.startswith("forecast")
        assert d.metrics["forecast_horizon_s"] == 60.0
        # Provisioned for the rate one start-up time from now, not for the present rate.
        assert abs(d.desired - math.ceil(rate(t + 60.0))) <= 1
        assert d.desired > math.ceil(rate(t)) + 1
    assert ahead[-1][1].metrics["forecast_mape"] < 0.05


def test_falls_back_to_llm_on_a_noisy_series() -> None:
    rng = random.Random(3)
    cfg = {**COMMON, "capacity_rps_per_replica": 1.0}
    p = PredictivePolicy(PredictiveConfig.model_validate(cfg))
    reference = LlmPolicy(LlmConfig.model_validate(COMMON))
    current = 4
    t = 0.0
    while t <= 900.0:
        s = state(current, rng.choice([1.0, 30.0]))
        d = p.decide(s, t)
        ref = reference.decide(s, t)
        assert d.desired == ref.desired
        assert d.reason.startswith("fallback to llm")
        assert d.metrics["forecast_used"] == 0.0
        current = d.desired
        t += TICK
    assert "MAPE" in d.reason and d.metrics["forecast_mape"] > 0.3


def test_falls_back_until_enough_forecasts_are_scored() -> None:
    p = PredictivePolicy(
        PredictiveConfig.model_validate({**COMMON, "capacity_rps_per_replica": 1.0})
    )
    d = p.decide(state(2, 5.0), 0.0)
    assert "only 0 forecast(s) scored" in d.reason


def test_horizon_is_a_high_percentile_of_measured_startups() -> None:
    p = PredictivePolicy(PredictiveConfig.model_validate(COMMON))
    s = TierState(tier="t", current_replicas=1, startup_s=(20.0, 30.0, 100.0))
    assert p.startup_s(s) == 100.0
    assert p.startup_s(TierState(tier="t", current_replicas=1)) == 30.0


def test_capacity_comes_from_the_llm_estimate_in_requests_per_second() -> None:
    p = PredictivePolicy(PredictiveConfig.model_validate(COMMON))
    s = state(1, 1.0)
    assert p.capacity_rps(s) is None
    saturated = tuple(replica(f"r{i}", kv=0.5, waiting=2, gen_tps=1000.0) for i in range(2))
    s = TierState(
        tier="t",
        current_replicas=2,
        replicas=saturated,
        arrival_rate_rps=1.0,
        mean_prompt_tokens=300.0,
        mean_output_tokens=100.0,
    )
    p.decide(s, 0.0)
    assert p.capacity_rps(s) == 2.5  # 1000 tokens/s over 400 tokens per request


def test_present_pressure_beats_a_low_forecast() -> None:
    p = PredictivePolicy(
        PredictiveConfig.model_validate({**COMMON, "capacity_rps_per_replica": 10.0})
    )
    t = 0.0
    while t <= 200.0:  # a flat, well-forecast rate: 5 req/s needs 1 replica
        p.decide(state(2, 5.0), t)
        t += TICK
    hot = tuple(replica(f"r{i}", kv=0.99) for i in range(2))
    s = TierState(
        tier="t", current_replicas=2, replicas=hot, arrival_rate_rps=5.0, startup_s=(60.0,)
    )
    d = p.decide(s, t)
    assert d.metrics["forecast_used"] == 1.0 and d.metrics["forecast.proposal"] == 1
    assert d.desired == 3 and "kv signal drives 3 replica(s) over the forecast" in d.reason


def test_default_smoothing_keeps_bursty_forecasts_calm() -> None:
    """Minute-scale bursts around a steady mean: the defaults' forecasts stay near the mean.

    The earlier constants (alpha 0.5, beta 0.3) swung the forecast a start-up time ahead
    from 0 to 7x the mean on the same series, which made the policy flap.
    """
    from strata.autoscale.forecast import HoltForecaster

    def spread(cfg: PredictiveConfig) -> tuple[float, float]:
        rng = random.Random(0)
        f = HoltForecaster(window_s=cfg.forecast_window_s, alpha=cfg.holt_alpha,
                           beta=cfg.holt_beta, damping_s=cfg.trend_damping_s)
        out = []
        for k in range(720):
            t = 5.0 * k
            burst = 6.0 if (k // 12) % 5 == 0 else 0.0  # one busy minute in five
            f.observe(t, max(0.0, 6.0 + burst + rng.gauss(0.0, 1.5)))
            fit = f.fit()
            assert fit is not None
            if k >= 120:
                out.append(fit.forecast(t + 93.0))
        return min(out), max(out)

    lo, hi = spread(PredictiveConfig.model_validate(COMMON))
    old_lo, old_hi = spread(PredictiveConfig.model_validate({**COMMON, "holt_alpha": 0.5, "holt_beta": 0.3}))
    assert hi - lo < 0.5 * (old_hi - old_lo)
    assert lo > 1.0 and hi < 20.0  # the mean is 7.2 req/s
