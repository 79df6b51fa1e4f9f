"""Synthetic arrival processes: Poisson, gamma with a burstiness coefficient, constant.

Gamma inter-arrival times with coefficient of variation ``cv`` have shape ``1/cv**2``;
``cv = 1`` is exactly Poisson, ``cv > 1`` is burstier than Poisson and ``cv < 1`` smoother.
All functions are seeded and pure, so a run's schedule is reproducible from its config.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from strata.bench.traces import Trace, TraceRecord


def gamma_arrivals(rate: float, n: int, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Arrival times (s, first at 0) of ``n`` requests at mean ``rate`` req/s."""
    if rate <= 0:
        raise ValueError(f"--rate must be > 0 req/s, got {rate}")
    if burstiness <= 0:
        raise ValueError(f"--burstiness (coefficient of variation) must be > 0, got {burstiness}")
    if n < 1:
        return []
    rng = np.random.default_rng(seed)
    shape = 1.0 / burstiness**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """Arrival times of a Poisson process: exponential gaps at mean ``rate`` req/s."""
    return gamma_arrivals(rate, n, 1.0, seed)


def constant_arrivals(rate: float, n: int) -> list[float]:
    """Evenly spaced arrivals at ``rate`` req/s: the no-variance case, for calibration."""
    if rate <= 0:
        raise ValueError(f"--rate must be > 0 req/s, got {rate}")
    return [i / rate for i in range(max(n, 0))]


def count_for_duration(rate: float, duration_s: float) -> int:
    """How many requests a synthetic run of ``duration_s`` at ``rate`` should schedule."""
    if duration_s <= 0:
        raise ValueError(f"--duration must be > 0 s, got {duration_s}")
    return max(1, round(rate * duration_s))


def retime(trace: Trace, arrivals: list[float], label: str) -> Trace:
    """Give a trace's requests new arrival times (keeping lengths and prefix ids)."""
    n = min(len(arrivals), len(trace.records))
    recs = tuple(replace(r, arrival_s=t) for r, t in zip(trace.records[:n], arrivals[:n],
                                                            strict=True))
    return replace(trace, records=recs, transforms=(*trace.transforms, label))


def synthetic_trace(arrivals: list[float], input_tokens: int, output_tokens: int,
                    label: str) -> Trace:
    """A trace of fixed-length requests at the given arrival times."""
    if input_tokens < 1 or output_tokens < 1:
        raise ValueError("--input-tokens and --output-tokens must be >= 1 for synthetic load")
    recs = tuple(TraceRecord(t, input_tokens, output_tokens) for t in arrivals)
    return Trace(name="synthetic", records=recs, transforms=(label,))
