"""A run of pure-decode steps, skipped through in closed form (see ``strata.sim.replica``).

Step ``i`` of a run starting at ``t0`` takes ``a + b i`` seconds (the cost model's
``decode_piece``), so the time of ``j`` steps and the steps done by a given time are
closed-form, and so is the engine's step-time EWMA after them (``ewma_after``).
"""

from __future__ import annotations

import math

from strata.engine.sequence import Sequence

EWMA_ALPHA = 0.2  # EngineCore._account


class DecodeRun:
    """A pure-decode run being skipped through: step i (from t0) takes a + b i seconds.

    ``slack`` holds each sequence's free token slots in its last KV block at t0: a
    sequence needs a new block at steps slack+1, slack+1+block_size, ...
    """

    __slots__ = ("t0", "a", "b", "k", "seqs", "slack", "block_size", "free0")

    def __init__(self, t0: float, a: float, b: float, k: int, seqs: list[Sequence],
                 slack: list[int], block_size: int, free0: int) -> None:
        self.t0, self.a, self.b, self.k, self.seqs = t0, a, b, k, seqs
        self.slack, self.block_size, self.free0 = slack, block_size, free0

    def time_of(self, j: int) -> float:
        """Seconds from t0 to the end of step j - 1 (j steps)."""
        return self.a * j + self.b * j * (j - 1) * 0.5

    def blocks_needed(self, j: int) -> int:
        """New KV blocks the sequences need for j steps."""
        bs = self.block_size
        return sum(-(-(j - r) // bs) for r in self.slack if j > r)

    def steps_done(self, elapsed: float) -> int:
        """Steps completed within ``elapsed`` seconds of t0 (at most k)."""
        if elapsed <= 0:
            return 0
        a, b = self.a, self.b
        if b <= 0:
            j = int(elapsed / a)
        else:
            h = a - 0.5 * b
            j = int((-h + math.sqrt(h * h + 2.0 * b * elapsed)) / b)
        # Repair float rounding at the boundaries.
        while j > 0 and self.time_of(j) > elapsed:
            j -= 1
        while j < self.k and self.time_of(j + 1) <= elapsed:
            j += 1
        return min(j, self.k)


def ewma_after(d0: float, a: float, b: float, j: int, alpha: float = EWMA_ALPHA) -> float:
    """EngineCore's step-time EWMA after j more values a, a + b, ..., a + b (j - 1).

    Closed form of j updates ``d = (1 - alpha) d + alpha v`` (the first value is taken as
    is when ``d0`` is 0, as the engine does).
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
