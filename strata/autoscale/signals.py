"""Turning Prometheus-style readings into the windowed signals a ``TierState`` carries.

Counters come from several processes that start, restart and go away, so a tier total is
kept by adding each source's increase (a reading below the last one is a restart: the
whole reading is the increase, as Prometheus' ``increase()`` assumes). Rates and
histogram increases are then taken over a sliding window of these totals. Histograms
become observations the way ``histogram_quantile`` reads them: a bucket's observations are
spread evenly between its bounds, so the percentile of the synthesized tuple is the
percentile Prometheus would report. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

MAX_OBSERVATIONS = 4096


@dataclass(frozen=True, slots=True)
class Sample:
    """One line of a Prometheus text page."""

    name: str
    labels: Mapping[str, str]
    value: float


def parse_samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (counters keep their ``_total`` name)."""
    out: list[Sample] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.append(Sample(s.name, dict(s.labels), float(s.value)))
    return out


def total(samples: Iterable[Sample], name: str, **match: str) -> float | None:
    """Sum of the samples named ``name`` whose labels include ``match``; None if none."""
    values = [s.value for s in samples if s.name == name
              and all(s.labels.get(k) == v for k, v in match.items())]
    return sum(values) if values else None


def buckets(samples: Iterable[Sample], name: str, **match: str) -> dict[float, float]:
    """Cumulative histogram counts by upper bound (``le``), summed over other labels."""
    out: dict[float, float] = {}
    for s in samples:
        if s.name != name or "le" not in s.labels:
            continue
        if not all(s.labels.get(k) == v for k, v in match.items()):
            continue
        le = float(s.labels["le"])
        out[le] = out.get(le, 0.0) + s.value
    return out


def histogram_observations(cumulative: Mapping[float, float],
                           limit: int = MAX_OBSERVATIONS) -> tuple[float, ...]:
    """Observations consistent with cumulative bucket counts (``le`` -> count).

    Counts may be fractional (Prometheus' ``increase`` extrapolates); each bucket's count is
    rounded. Observations in the ``+Inf`` bucket are placed at the highest finite bound, as
    ``histogram_quantile`` does. Beyond ``limit`` observations all counts are scaled down,
    which keeps every percentile.
    """
    bounds = sorted(cumulative)
    per_bucket: list[tuple[float, float, float]] = []  # (low, high, count)
    low, prev = 0.0, 0.0
    for le in bounds:
        c = max(0.0, cumulative[le] - prev)
        prev = max(prev, cumulative[le])
        high = le if math.isfinite(le) else low
        per_bucket.append((low, high, c))
        if math.isfinite(le):
            low = le
    n = sum(c for _, _, c in per_bucket)
    scale = limit / n if n > limit else 1.0
    out: list[float] = []
    for lo, hi, c in per_bucket:
        k = int(round(c * scale))
        out.extend(lo + (hi - lo) * (i + 0.5) / k for i in range(k))
    return tuple(out)


class CounterWindow:
    """A tier-wide counter built from per-source readings, with a sliding window."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._last: dict[str, float] = {}
        self._total = 0.0
        self._history: deque[tuple[float, float]] = deque()

    @property
    def value(self) -> float:
        """The tier total since this window was created."""
        return self._total

    def update(self, now: float, readings: Mapping[str, float]) -> float:
        """Fold in one reading per source; returns the increase since the last update."""
        added = 0.0
        for source, v in readings.items():
            last = self._last.get(source)
            added += v if last is None or v < last else v - last
            self._last[source] = v
        for gone in set(self._last) - set(readings):
            del self._last[gone]
        self._total += added
        self._history.append((now, self._total))
        while len(self._history) > 2 and self._history[1][0] <= now - self.window_s:
            self._history.popleft()
        return added

    def increase(self) -> float:
        """Increase over the window (or since the first update, if that is more recent)."""
        if not self._history:
            return 0.0
        return self._history[-1][1] - self._history[0][1]

    def span_s(self) -> float:
        """Seconds the window's history covers now."""
        if len(self._history) < 2:
            return 0.0
        return self._history[-1][0] - self._history[0][0]

    def rate(self) -> float:
        """Per-second increase over the window; 0 until two updates are seen."""
        span = self.span_s()
        return self.increase() / span if span > 0 else 0.0

    @property
    def num_sources(self) -> int:
        """Sources whose last reading is kept (those in the latest update)."""
        return len(self._last)

    @property
    def idle(self) -> bool:
        """No source reports it any more and it rose by nothing over the window."""
        return not self._last and self.increase() == 0


@dataclass
class HistogramWindow:
    """One ``CounterWindow`` per bucket bound: a windowed, restart-safe histogram."""

    window_s: float
    _buckets: dict[float, CounterWindow] = field(default_factory=dict)

    def update(self, now: float, readings: Mapping[str, Mapping[float, float]]) -> None:
        """``readings``: source -> cumulative counts by ``le``."""
        bounds = {le for r in readings.values() for le in r} | set(self._buckets)
        for le in bounds:
            cw = self._buckets.setdefault(le, CounterWindow(self.window_s))
            cw.update(now, {src: r[le] for src, r in readings.items() if le in r})
            if cw.idle:  # a bound nobody exports any more: forget it, so bounds stay few
                del self._buckets[le]

    def increases(self) -> dict[float, float]:
        """Cumulative bucket increases over the window."""
        return {le: cw.increase() for le, cw in self._buckets.items()}

    def observations(self) -> tuple[float, ...]:
        """The window's observations, synthesized from bucket increases."""
        return histogram_observations(self.increases())

    def __len__(self) -> int:
        """Bucket bounds held."""
        return len(self._buckets)
