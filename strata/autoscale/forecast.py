"""Arrival-rate forecasting for the predictive policy, and a record of how wrong it was.

The forecaster is Holt's linear trend method (double exponential smoothing without a
seasonal term) refitted at each step over a sliding window of recent observations:

    level_t = alpha * y_t + (1 - alpha) * (level_{t-1} + trend_{t-1} * dt)
    trend_t = beta * (level_t - level_{t-1}) / dt + (1 - beta) * trend_{t-1}
    forecast(t + h) = max(0, level_t + trend_t * h)

With ``damping_s`` (tau) the trend is damped as in Gardner and McKenzie's damped-trend
method, in continuous time: a trend carried over dt keeps exp(-dt / tau) of itself, and
a forecast h ahead adds trend * tau * (1 - exp(-h / tau)) instead of trend * h, so no
projection adds more than tau seconds of the current trend. Undamped Holt projected a
one-minute burst's slope a full start-up time ahead and made the policy flap.

The trend is kept per second so irregular sampling is handled; refitting over a window
(rather than smoothing forever) lets a regime change be forgotten in ``window_s``. It
anticipates ramps, which is what scaling ahead by the start-up time needs, and is cheap
and transparent; diurnal seasonality is left to longer-horizon planners.

The error tracker keeps each forecast until its target time has come, scores it against
the rate then observed (absolute percentage error, with a floor on the denominator so an
idle tier does not produce infinite errors) and reports the mean over a recent window
(MAPE).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HoltFit:
    """The smoothed level and per-second trend at the time of the last observation."""

    level: float
    trend: float
    at: float
    damping_s: float | None = None

    def forecast(self, t: float) -> float:
        """The rate expected at time ``t`` (never negative)."""
        return max(0.0, self.level + self.trend * _reach(t - self.at, self.damping_s))


def _reach(h: float, damping_s: float | None) -> float:
    """Seconds of trend a projection h ahead applies: h, or tau * (1 - exp(-h / tau))."""
    if damping_s is None or h <= 0:
        return h
    return damping_s * -math.expm1(-h / damping_s)


class HoltForecaster:
    """Holt's linear trend over a sliding window of (time, value) observations."""

    def __init__(
        self,
        *,
        window_s: float = 600.0,
        alpha: float = 0.5,
        beta: float = 0.3,
        damping_s: float | None = None,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"forecast window must be > 0 s, got {window_s}")
        if damping_s is not None and damping_s <= 0:
            raise ValueError(f"trend damping must be > 0 s (or None), got {damping_s}")
        if not (0.0 < alpha <= 1.0 and 0.0 < beta <= 1.0):
            raise ValueError(f"Holt alpha and beta must be in (0, 1], got {alpha}, {beta}")
        self.window_s = window_s
        self.alpha = alpha
        self.beta = beta
        self.damping_s = damping_s
        self._observations: deque[tuple[float, float]] = deque()

    def observe(self, t: float, value: float) -> None:
        """Add an observation and forget those older than the window."""
        if self._observations and t < self._observations[-1][0]:
            raise ValueError(
                f"observations must not go back in time ({t} < {self._observations[-1][0]})"
            )
        self._observations.append((t, value))
        while self._observations and self._observations[0][0] < t - self.window_s:
            self._observations.popleft()

    def __len__(self) -> int:
        return len(self._observations)

    def fit(self) -> HoltFit | None:
        """Level and trend over the window; None before the first observation."""
        if not self._observations:
            return None
        it = iter(self._observations)
        t_prev, level = next(it)
        trend = 0.0
        for t, y in it:
            dt = t - t_prev
            if dt <= 0:  # same instant: refine the level only
                level = self.alpha * y + (1.0 - self.alpha) * level
                continue
            prev_level = level
            level = self.alpha * y + (1.0 - self.alpha) * (level + trend * _reach(dt, self.damping_s))
            carried = trend if self.damping_s is None else trend * math.exp(-dt / self.damping_s)
            trend = self.beta * (level - prev_level) / dt + (1.0 - self.beta) * carried
            t_prev = t
        return HoltFit(level=level, trend=trend, at=t_prev, damping_s=self.damping_s)


class ForecastErrors:
    """Mean absolute percentage error of forecasts whose target time has passed."""

    def __init__(self, *, window_s: float = 300.0, floor: float = 0.5) -> None:
        self.window_s = window_s
        self.floor = floor
        self._pending: deque[tuple[float, float]] = deque()  # (target time, forecast)
        self._errors: deque[tuple[float, float]] = deque()  # (scored at, error)

    def expect(self, target_t: float, forecast: float) -> None:
        """Remember a forecast for ``target_t`` to score it when that time comes."""
        self._pending.append((target_t, forecast))

    def score(self, now: float, actual: float) -> None:
        """Score every forecast that has come due against the rate observed now."""
        due = [f for t, f in self._pending if t <= now]
        self._pending = deque((t, f) for t, f in self._pending if t > now)
        for forecast in due:
            self._errors.append((now, abs(actual - forecast) / max(actual, self.floor)))
        while self._errors and self._errors[0][0] < now - self.window_s:
            self._errors.popleft()

    @property
    def count(self) -> int:
        """How many forecasts were scored within the window."""
        return len(self._errors)

    @property
    def mape(self) -> float | None:
        """Mean absolute percentage error over the window; None before any was scored."""
        if not self._errors:
            return None
        return sum(e for _, e in self._errors) / len(self._errors)
