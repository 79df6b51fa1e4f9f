from __future__ import annotations

import asyncio

import pytest

from strata.gateway.admission import Admission, ModelQueue, QueueFull, QueueTimeout


async def test_unlimited_admits_at_once() -> None:
    q = Admission(None, 0).queue("m")
    for _ in range(100):
        await q.acquire(0.0)
    assert q.in_flight == 100


async def test_waiters_are_served_in_order_and_bounded() -> None:
    q = ModelQueue("m", max_in_flight=1, max_queued=2)
    await q.acquire(1.0)
    order: list[int] = []

    async def waiter(i: int) -> None:
        await q.acquire(5.0)
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(2)]
    await asyncio.sleep(0.01)
    assert q.queued == 2
    with pytest.raises(QueueFull, match="queue for model 'm' is full"):
        await q.acquire(1.0)
    q.release()
    await asyncio.sleep(0.01)
    q.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1]
    assert q.in_flight == 1 and q.queued == 0


async def test_timeout_and_cancellation_leave_counts_right() -> None:
    q = ModelQueue("m", max_in_flight=1, max_queued=5)
    await q.acquire(1.0)
    with pytest.raises(QueueTimeout):
        await q.acquire(0.02)
    t = asyncio.create_task(q.acquire(5.0))
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert q.queued == 0
    q.release()  # nobody live waits: the slot is freed
    assert q.in_flight == 0


def test_bad_limits_fail_fast() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        Admission(0, 10)
