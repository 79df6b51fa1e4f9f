"""Bounded admission per model: at most ``max_in_flight`` proxied, ``max_queued`` waiting.

Requests wait here for an in-flight slot, and also while no replica of their model is
ready (scale-from-zero activation, all replicas out). Past ``max_queued`` waiters a request
is refused at once with 503, so a burst cannot pile unbounded memory onto the gateway.
"""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(Exception):
    """The model's queue holds ``max_queued`` requests already."""


class QueueTimeout(Exception):
    """A request waited its whole budget without getting a slot."""


class ModelQueue:
    """FIFO admission for one model (only the event loop touches it)."""

    def __init__(self, model: str, max_in_flight: int | None, max_queued: int) -> None:
        """``max_in_flight`` None: unlimited (replicas queue themselves)."""
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight per model must be >= 1 (or unset for no limit)")
        if max_queued < 0:
            raise ValueError("max_queued per model must be >= 0")
        self.model = model
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.in_flight = 0
        self.queued = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def enter_waiting(self) -> None:
        """Count one more waiter, or refuse it when the queue is full."""
        if self.queued >= self.max_queued:
            raise QueueFull(f"the queue for model {self.model!r} is full "
                            f"({self.max_queued} requests waiting); retry later")
        self.queued += 1

    def leave_waiting(self) -> None:
        """A waiter stopped waiting."""
        self.queued -= 1

    async def acquire(self, timeout_s: float) -> None:
        """Take an in-flight slot, waiting in FIFO order for at most ``timeout_s``."""
        if self.max_in_flight is None or (self.in_flight < self.max_in_flight
                                          and not self._waiters):
            self.in_flight += 1
            return
        self.enter_waiting()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            if not (fut.done() and not fut.cancelled()):
                fut.cancel()
                raise QueueTimeout(f"no slot for model {self.model!r} within "
                                   f"{timeout_s:g} s ({self.max_in_flight} in flight)") from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                fut.cancel()
            raise
        finally:
            self.leave_waiting()

    def release(self) -> None:
        """Return a slot: hand it to the oldest live waiter, or free it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes over; in_flight is unchanged
                return
        self.in_flight -= 1


class Admission:
    """One ModelQueue per model name, created on first use."""

    def __init__(self, max_in_flight: int | None, max_queued: int) -> None:
        """Limits apply to every model alike."""
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self._queues: dict[str, ModelQueue] = {}
        ModelQueue("", max_in_flight, max_queued)  # validate the limits now

    def queue(self, model: str) -> ModelQueue:
        """The queue of ``model``."""
        q = self._queues.get(model)
        if q is None:
            q = self._queues[model] = ModelQueue(model, self.max_in_flight, self.max_queued)
        return q

    def prune(self, q: ModelQueue) -> None:
        """Forget an idle queue, so model names clients invent cannot pile up queues."""
        if q.in_flight == 0 and q.queued == 0 and not q._waiters:  # noqa: SLF001
            if self._queues.get(q.model) is q:
                del self._queues[q.model]

    def __len__(self) -> int:
        return len(self._queues)
