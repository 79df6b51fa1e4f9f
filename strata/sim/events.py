"""The discrete-event loop: a heap of callbacks in virtual time.

Deterministic: events at the same instant run in the order they were scheduled (an
insertion counter breaks ties), and nothing here reads a clock. Cancellation is left to
the callers (they carry a version number and ignore stale events), which keeps the heap a
plain list of tuples, the fastest structure CPython offers for this.

A replay schedules every arrival up front (``at_each``); those wait outside the heap and
enter it one at a time, each with the order number it was given when scheduled, so the
heap stays as small as the events actually in flight and runs them in the same order.
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
        self._queued = 0  # scheduled by at_each and not in the heap yet
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

    def at_each(self, times: list[float], fn: Callable[..., Any],
                args: list[tuple[Any, ...]]) -> None:
        """``at(times[i], fn, *args[i])`` for every i, in that order; times must not decrease."""
        if any(b < a for a, b in zip(times, times[1:], strict=False)):
            for t, a in zip(times, args, strict=True):
                self.at(t, fn, *a)
            return
        if len(times) != len(args):
            raise ValueError("at_each needs one argument tuple per time")
        if not times:
            return
        now = self.now
        times = [t if t >= now else now for t in times]  # at()'s clamp, as of now
        stream = (times, args, fn, self._order)
        self._order += len(times)
        self._queued += len(times) - 1
        heapq.heappush(self._heap, (times[0], stream[3], self._next_of, (stream, 0)))

    def _next_of(self, stream: tuple[list[float], list[tuple[Any, ...]], Callable[..., Any],
                                     int], i: int) -> None:
        times, args, fn, order0 = stream
        if i + 1 < len(times):
            heapq.heappush(self._heap, (times[i + 1], order0 + i + 1, self._next_of,
                                        (stream, i + 1)))
            self._queued -= 1
        fn(*args[i])

    def __len__(self) -> int:
        return len(self._heap) + self._queued

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
