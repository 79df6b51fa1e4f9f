"""The paper experiment's pieces: the day-shaped load, the oracle, the configurations."""

from __future__ import annotations

import math

import pytest

from strata.bench.traces import Trace, TraceRecord
from strata.sim.experiments import (
    DayOptions,
    PaperOptions,
    configurations,
    day_trace,
    diurnal_factor,
    oracle,
    rates,
)


def hour_trace(rate: float = 0.25) -> Trace:
    n = int(3600 * rate)
    return Trace("toy", tuple(TraceRecord(i / rate, 100 + i % 7, 20) for i in range(n)))


def test_diurnal_factor_has_mean_one_and_the_asked_peak_to_trough() -> None:
    xs = [diurnal_factor(t * 60.0, 4.0, 14.0) for t in range(24 * 60)]
    assert sum(xs) / len(xs) == pytest.approx(1.0, abs=1e-9)
    assert max(xs) / min(xs) == pytest.approx(4.0, rel=1e-3)
    assert max(range(len(xs)), key=xs.__getitem__) == 14 * 60


def test_a_compressed_day_repeats_the_curve_every_period() -> None:
    xs = [diurnal_factor(t * 60.0, 4.0, 3.5, period_hours=6.0) for t in range(6 * 60)]
    assert sum(xs) / len(xs) == pytest.approx(1.0, abs=1e-9)
    assert max(xs) / min(xs) == pytest.approx(4.0, rel=1e-3)
    assert max(range(len(xs)), key=xs.__getitem__) == 210
    day = day_trace(hour_trace(), DayOptions(hours=6, peak_hour=3.5, period_hours=6.0, seed=1))
    hourly = rates(day, 3600.0)
    assert len(day.records) / (6 * 3600 * 0.25) == pytest.approx(1.0, rel=0.03)
    assert hourly.index(max(hourly)) == 3 and hourly.index(min(hourly)) == 0


def test_day_trace_follows_the_curve_and_keeps_lengths() -> None:
    base = hour_trace()
    day = day_trace(base, DayOptions(hours=24, rate_scale=1.5, seed=3))
    assert len(day.records) / (24 * 3600 * 0.25) == pytest.approx(1.5, rel=0.02)
    hourly = rates(day, 3600.0)
    assert max(hourly) / min(hourly) > 3.0
    assert hourly.index(max(hourly)) in (13, 14)
    assert {r.input_tokens for r in day.records} == {r.input_tokens for r in base.records}
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(day.records[:-1], day.records[1:], strict=True))
    assert day_trace(base, DayOptions(hours=2, seed=3)).records == \
        day_trace(base, DayOptions(hours=2, seed=3)).records


def test_oracle_counts_units_per_minute_and_their_start_ups() -> None:
    recs = [TraceRecord(t, 10, 10) for t in (0.0, 1.0, 2.0)] + \
        [TraceRecord(60.0 + 0.1 * i, 10, 10) for i in range(300)]
    tr = Trace("burst", tuple(recs))
    o = oracle(tr, cap=2.0, startup_s=30.0, gpus=1)
    # minute 0: 3/60 req/s -> 1 unit; minute 1: 5 req/s -> 3 units; two start-ups of 1 + 2.
    assert o["gpu_hours"] == pytest.approx(((1 + 3) * 60 + (1 + 2) * 30) / 3600)
    assert o["fluid_gpu_hours"] == pytest.approx(303 / 2.0 / 3600)
    assert o["peak_units"] == 3
    # A unit kind with more requests/s per GPU lowers the fluid figure, never raises it.
    assert oracle(tr, cap=2.0, startup_s=30.0, gpus=1, best_rps_per_gpu=3.0)[
        "fluid_gpu_hours"] == pytest.approx(303 / 3.0 / 3600)
    assert oracle(tr, cap=2.0, startup_s=30.0, gpus=1, best_rps_per_gpu=1.0)[
        "fluid_gpu_hours"] == pytest.approx(303 / 2.0 / 3600)


def test_configurations_size_static_deployments_from_capacity() -> None:
    day = day_trace(hour_trace(), DayOptions(hours=24, rate_scale=1.0))
    confs = dict((name, (cluster, stages)) for name, cluster, stages in
                 configurations(PaperOptions(), day, cap=0.05, cap_stage=0.08, mean_tokens=120))
    mean = len(day.records) / day.duration_s
    assert confs["static-mean"][0]["replicas"] == math.ceil(mean / 0.05)
    assert confs["static-peak"][0]["replicas"] > confs["static-mean"][0]["replicas"]
    assert confs["hpa-gpu-util"][0]["autoscaling"]["metrics"][0]["name"] == \
        "custom_gpu_utilization"
    assert confs["strata-llm"][0]["routing"] == "resource_match"
    assert confs["strata-predictive"][0]["autoscaling"]["policy"] == "predictive"
    assert confs["strata-stages"][1] == 2
