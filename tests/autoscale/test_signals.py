"""Windowed counters and histograms from several restarting sources."""

from __future__ import annotations

import math

import pytest

from strata.autoscale.signals import (
    CounterWindow,
    HistogramWindow,
    buckets,
    histogram_observations,
    parse_samples,
    total,
)
from strata.autoscale.types import percentile

PAGE = """# HELP strata_cluster_requests_received_total Generation requests.
# TYPE strata_cluster_requests_received_total counter
strata_cluster_requests_received_total{tier="engine"} 12.0
strata_cluster_requests_received_total{tier="other"} 5.0
# HELP strata_gateway_ttft_seconds Time to first byte.
# TYPE strata_gateway_ttft_seconds histogram
strata_gateway_ttft_seconds_bucket{le="0.5",model="a"} 2.0
strata_gateway_ttft_seconds_bucket{le="1.0",model="a"} 6.0
strata_gateway_ttft_seconds_bucket{le="+Inf",model="a"} 7.0
strata_gateway_ttft_seconds_bucket{le="0.5",model="b"} 1.0
strata_gateway_ttft_seconds_bucket{le="1.0",model="b"} 1.0
strata_gateway_ttft_seconds_bucket{le="+Inf",model="b"} 1.0
strata_gateway_ttft_seconds_count{model="a"} 7.0
"""


def test_parse_and_select_samples() -> None:
    samples = parse_samples(PAGE)
    assert total(samples, "strata_cluster_requests_received_total", tier="engine") == 12.0
    assert total(samples, "strata_cluster_requests_received_total") == 17.0
    assert total(samples, "no_such_series") is None
    assert buckets(samples, "strata_gateway_ttft_seconds_bucket") == {
        0.5: 3.0, 1.0: 7.0, math.inf: 8.0}
    assert buckets(samples, "strata_gateway_ttft_seconds_bucket", model="b") == {
        0.5: 1.0, 1.0: 1.0, math.inf: 1.0}


def test_histogram_observations_spread_within_buckets_like_histogram_quantile() -> None:
    obs = histogram_observations({0.5: 3.0, 1.0: 7.0, math.inf: 8.0})
    assert len(obs) == 8
    assert sorted(obs) == pytest.approx([1 / 12, 3 / 12, 5 / 12, 0.5625, 0.6875, 0.8125,
                                         0.9375, 1.0])
    # +Inf observations sit at the highest finite bound, as histogram_quantile reports them.
    assert percentile(obs, 100) == 1.0
    assert histogram_observations({}) == ()
    assert histogram_observations({0.1: 0.0, math.inf: 0.0}) == ()


def test_histogram_observations_round_fractional_counts_and_cap_the_total() -> None:
    assert len(histogram_observations({1.0: 2.4, 2.0: 4.9})) == 2 + 3
    big = histogram_observations({1.0: 10_000.0, 2.0: 30_000.0}, limit=300)
    assert len(big) == 300
    assert sum(1 for o in big if o <= 1.0) == 100  # the proportions are kept


def test_counter_window_adds_increases_across_sources_and_restarts() -> None:
    w = CounterWindow(window_s=10)
    assert w.update(0, {"a": 5.0}) == 5.0  # a new source: its whole count is new
    assert w.update(1, {"a": 7.0, "b": 1.0}) == 3.0
    assert w.update(2, {"a": 2.0, "b": 1.0}) == 2.0  # a restarted: reading below the last
    assert w.update(3, {"b": 4.0}) == 3.0  # a went away
    assert w.value == 13.0
    assert w.increase() == 8.0  # since the first update (t=0 held 5)
    assert w.rate() == pytest.approx(8.0 / 3)


def test_counter_window_slides() -> None:
    w = CounterWindow(window_s=5)
    for t in range(20):
        w.update(float(t), {"a": 2.0 * t})
    assert w.span_s() == 5.0
    assert w.rate() == pytest.approx(2.0)
    assert w.increase() == pytest.approx(10.0)
    with pytest.raises(ValueError):
        CounterWindow(0)


def test_histogram_window_tracks_bucket_increases() -> None:
    h = HistogramWindow(window_s=60)
    h.update(0, {"a": {1.0: 1.0, math.inf: 1.0}})
    h.update(1, {"a": {1.0: 3.0, math.inf: 4.0}, "b": {1.0: 1.0, math.inf: 1.0}})
    assert h.increases() == {1.0: 3.0, math.inf: 4.0}
    assert len(h.observations()) == 4
