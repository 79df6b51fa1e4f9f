"""A run of pure-decode steps, skipped through in closed form (see ``strata.sim.replica``).

Step ``i`` of a run starting at ``t0`` takes ``a + b i`` seconds (the cost model's
``decode_piece``), so the time of ``j`` steps and the steps done by a given time are
closed-form, and so is the engine's step-time EWMA after them
(``strata.load_meter.ewma_after``).
"""

from __future__ import annotations

import math
from bisect import bisect_left

from strata.engine.sequence import Sequence


class DecodeRun:
    """A pure-decode run being skipped through: step i (from t0) takes a + b i seconds.

    ``slack`` holds each sequence's free token slots in its last KV block at t0: a
    sequence needs a new block at steps slack+1, slack+1+block_size, ... Slack lies in
    [0, block_size] (a decode's table covers its computed tokens, at most one block more),
    so ``blocks_needed`` answers with two bisections of the sorted slack values instead of
    a pass over the batch: the gateway asks it at every load report.
    """

    __slots__ = ("t0", "a", "b", "k", "seqs", "slack", "block_size", "free0", "_sorted",
                 "left")

    def __init__(self, t0: float, a: float, b: float, k: int, seqs: list[Sequence],
                 slack: list[int], block_size: int, free0: int) -> None:
        self.t0, self.a, self.b, self.k, self.seqs = t0, a, b, k, seqs
        # Steps until the first sequence reaches max_tokens: k as constructed (the caller
        # passes that minimum and may shorten k afterwards); the replica counts it down.
        self.left = k
        self.slack, self.block_size, self.free0 = slack, block_size, free0
        self._sorted: list[int] | None = None  # sorted(slack), once asked for

    def time_of(self, j: int) -> float:
        """Seconds from t0 to the end of step j - 1 (j steps)."""
        return self.a * j + self.b * j * (j - 1) * 0.5

    def shift_slack(self, j: int) -> None:
        """The slack after j steps: a sequence that filled its last block starts a new one."""
        bs = self.block_size
        self.slack = [r - j if r >= j else (r - j) % bs for r in self.slack]
        self._sorted = None

    def blocks_needed(self, j: int) -> int:
        """New KV blocks the sequences need for j steps: the sum of ceil((j - r) / bs)
        over the slack values r < j."""
        bs = self.block_size
        srt = self._sorted
        if srt is None:
            srt = self._sorted = sorted(self.slack)
        if srt and (srt[0] < 0 or srt[-1] > bs):  # outside what the closed form covers
            return sum(-(-(j - r) // bs) for r in srt if j > r)
        if j <= 0:
            return 0
        # With j - 1 = q bs + m, ceil((j - r) / bs) is q + 1 for r <= m and q for r > m.
        q, m = divmod(j - 1, bs)
        lt = bisect_left(srt, j)
        if m + 1 < j:
            return lt * (q + 1) - (lt - bisect_left(srt, m + 1))
        return lt * (q + 1)

    def steps_done(self, elapsed: float) -> int:
        """Steps completed within ``elapsed`` seconds of t0 (at most k)."""
        if elapsed <= 0:
            return 0
        a, b, k = self.a, self.b, self.k
        if b <= 0:
            j = int(elapsed / a)
        else:
            h = a - 0.5 * b
            j = int((-h + math.sqrt(h * h + 2.0 * b * elapsed)) / b)
        # Repair float rounding at the boundaries (time_of, inlined).
        while j > 0 and a * j + b * j * (j - 1) * 0.5 > elapsed:
            j -= 1
        while j < k:
            i = j + 1
            if a * i + b * i * (i - 1) * 0.5 > elapsed:
                break
            j = i
        return j if j < k else k
