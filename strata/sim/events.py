"""The discrete-event loop: a heap of callbacks in virtual time.

Deterministic: events at the same instant run in the order they were scheduled (an
insertion counter breaks ties), and nothing here reads a clock. Cancellation is left to
the callers (they carry a version number and ignore stale events), which keeps the heap a
plain list of tuples, the fastest structure CPython offers for this.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any


class EventLoop:
    """A min-heap of ``(time, order, callback, args)``; ``now`` is the current virtual time."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now = start_s
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._order = 0
        self.processed = 0

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` at virtual time ``t`` (not before ``now``)."""
        if t < self.now:
            t = self.now
        heapq.heappush(self._heap, (t, self._order, fn, args))
        self._order += 1

    def after(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` ``delay_s`` seconds from now."""
        self.at(self.now + delay_s, fn, *args)

    def __len__(self) -> int:
        return len(self._heap)

    def run(self, until_s: float = math.inf) -> None:
        """Process events in time order until none is left or the next is after ``until_s``."""
        heap = self._heap
        pop = heapq.heappop
        n = 0
        while heap:
            if heap[0][0] > until_s:
                self.now = until_s
                break
            t, _, fn, args = pop(heap)
            self.now = t
            fn(*args)
            n += 1
        self.processed += n
