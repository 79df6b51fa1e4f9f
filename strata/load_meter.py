"""The measurements behind a LoadReport: recent token rates and step-time averages.

One meter, recorded once per step, by every replica that publishes a report: the engine
(`EngineCore`), a stage replica (`StageWorker`) and the simulator's replica, which also
advances it over a run of pure-decode steps in closed form (`record_decode_run`). So the
definition of "tokens/s over the recent window" and of the step-time averages the router
reads lives here only, and the simulator measures exactly what the live code measures.

Rates are counts over a sliding window divided by the time since the oldest step still
in it; the averages are exponentially weighted (weight ``EWMA_ALPHA`` on the newest),
seeded by their first value.
"""

from __future__ import annotations

import math
from collections import deque

WINDOW_S = 10.0  # the rate window
EWMA_ALPHA = 0.2  # weight of the newest step in the step-time averages
# A step with fewer prompt tokens says little about prefill speed: it leaves
# prefill_token_s alone (its time is mostly the fixed cost of a step).
PREFILL_MIN_TOKENS = 32


class LoadMeter:
    """Token rates over a sliding window, step-time EWMAs and lifetime totals of one replica.

    Time is whatever clock the caller passes as ``now`` (monotonic seconds live, virtual
    seconds in the simulator); the meter reads no clock itself.
    """

    __slots__ = ("window_s", "started", "events", "window_prompt_tokens",
                 "window_generated_tokens", "decode_step_s", "prefill_token_s",
                 "total_prompt_tokens", "total_generated_tokens", "total_busy_s")

    def __init__(self, started: float = 0.0, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.started = started  # when the replica began: the busy ratio's longest span
        # (end time, prompt tokens, generated tokens, busy seconds) per recorded step
        self.events: deque[tuple[float, int, int, float]] = deque()
        # the window's token sums, kept up to date (counts are ints: no rounding drift)
        self.window_prompt_tokens = 0
        self.window_generated_tokens = 0
        self.decode_step_s = 0.0  # mean wall time of a step without prefill
        self.prefill_token_s = 0.0  # mean seconds per token of a step with enough prefill
        self.total_prompt_tokens = 0
        self.total_generated_tokens = 0
        self.total_busy_s = 0.0

    def record(self, now: float, step_s: float, prompt_tokens: int, num_tokens: int,
               generated_tokens: int) -> None:
        """One step that ended at ``now`` after ``step_s`` seconds: ``prompt_tokens``
        prefilled among the ``num_tokens`` it ran, ``generated_tokens`` sampled."""
        self.events.append((now, prompt_tokens, generated_tokens, step_s))
        self.window_prompt_tokens += prompt_tokens
        self.window_generated_tokens += generated_tokens
        self.total_prompt_tokens += prompt_tokens
        self.total_generated_tokens += generated_tokens
        self.total_busy_s += step_s
        if self.events[0][0] < now - self.window_s:
            self._trim(now)
        if not prompt_tokens:
            if num_tokens:
                d = self.decode_step_s
                self.decode_step_s = step_s if d == 0 else (1 - EWMA_ALPHA) * d + EWMA_ALPHA * step_s
        elif prompt_tokens >= PREFILL_MIN_TOKENS:
            per_tok = step_s / num_tokens
            p = self.prefill_token_s
            self.prefill_token_s = (per_tok if p == 0
                                    else (1 - EWMA_ALPHA) * p + EWMA_ALPHA * per_tok)

    def record_decode_run(self, end: float, busy_s: float, generated_tokens: int,
                          a: float, b: float, steps: int) -> None:
        """``steps`` pure-decode steps whose step i took ``a + b i`` seconds, as if each had
        been recorded, but counted as one event at ``end`` (the simulator's skipped runs)."""
        self.events.append((end, 0, generated_tokens, busy_s))
        self.window_generated_tokens += generated_tokens
        self.total_generated_tokens += generated_tokens
        self.total_busy_s += busy_s
        if self.events[0][0] < end - self.window_s:
            self._trim(end)
        self.decode_step_s = self.decode_step_after(a, b, steps)

    def decode_step_after(self, a: float, b: float, steps: int) -> float:
        """``decode_step_s`` after ``steps`` more decode steps taking a, a + b, a + 2b, ...

        Closed form of that many EWMA updates; the meter is not changed.
        """
        return ewma_after(self.decode_step_s, a, b, steps)

    def _trim(self, now: float) -> None:
        ev = self.events
        cutoff = now - self.window_s
        while ev and ev[0][0] < cutoff:
            _, p, g, _ = ev.popleft()
            self.window_prompt_tokens -= p
            self.window_generated_tokens -= g

    def rates(self, now: float, more_generated: int = 0,
              more_since: float = math.inf) -> tuple[float, float]:
        """(prompt tokens/s, generated tokens/s) over the window ending at ``now``.

        ``more_generated`` tokens generated since ``more_since`` and not recorded yet count
        too (the simulator's run in progress).
        """
        ev = self.events
        if ev and ev[0][0] < now - self.window_s:
            self._trim(now)
        first = ev[0][0] if ev else math.inf
        if more_since < first:
            first = more_since
        if first == math.inf:
            return 0.0, 0.0
        span = now - first
        if span < 1e-3:
            span = 1e-3
        return (self.window_prompt_tokens / span,
                (self.window_generated_tokens + more_generated) / span)

    def busy_ratio(self, now: float) -> float:
        """Fraction of the recent wall time spent in steps (0..1): the window, or the time
        since ``started`` when that is shorter."""
        ev = self.events
        if ev and ev[0][0] < now - self.window_s:
            self._trim(now)
        span = min(self.window_s, max(now - self.started, 1e-3))
        return min(1.0, sum(e[3] for e in ev) / span)


def ewma_after(d0: float, a: float, b: float, j: int, alpha: float = EWMA_ALPHA) -> float:
    """The step-time EWMA from ``d0`` after j more values a, a + b, ..., a + b (j - 1).

    Closed form of j updates ``d = (1 - alpha) d + alpha v`` (the first value is taken as
    is when ``d0`` is 0, as `LoadMeter.record` does).
    """
    if j <= 0:
        return d0
    if d0 == 0:
        d0, a, j = a, a + b, j - 1
        if j == 0:
            return d0
    r = 1.0 - alpha
    rj = r ** j
    s0 = (1.0 - rj) / (1.0 - r)
    s1 = r * (1.0 - j * r ** (j - 1) + (j - 1) * rj) / (1.0 - r) ** 2
    return rj * d0 + alpha * ((a + b * (j - 1)) * s0 - b * s1)
