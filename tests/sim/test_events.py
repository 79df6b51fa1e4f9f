"""Event loop: time order, insertion order at equal times, the horizon."""

from __future__ import annotations

from strata.sim.events import EventLoop


def test_events_run_in_time_then_insertion_order() -> None:
    loop = EventLoop()
    seen: list[tuple[float, str]] = []
    loop.at(2.0, lambda: seen.append((loop.now, "b")))
    loop.at(1.0, lambda: seen.append((loop.now, "a")))
    loop.at(2.0, lambda: seen.append((loop.now, "c")))
    loop.run()
    assert seen == [(1.0, "a"), (2.0, "b"), (2.0, "c")]
    assert loop.processed == 3


def test_callbacks_schedule_more_and_the_past_is_clamped() -> None:
    loop = EventLoop()
    seen: list[float] = []

    def tick(n: int) -> None:
        seen.append(loop.now)
        if n:
            loop.after(0.5, tick, n - 1)
            loop.at(loop.now - 10.0, seen.append, -1.0)  # never before now

    loop.at(0.0, tick, 2)
    loop.run()
    assert seen == [0.0, -1.0, 0.5, -1.0, 1.0]


def test_run_stops_at_the_horizon_and_resumes() -> None:
    loop = EventLoop()
    seen: list[float] = []
    for t in (1.0, 2.0, 3.0):
        loop.at(t, seen.append, t)
    loop.run(until_s=2.5)
    assert seen == [1.0, 2.0] and loop.now == 2.5 and len(loop) == 1
    loop.run()
    assert seen == [1.0, 2.0, 3.0]


def test_at_each_runs_in_the_same_order_as_one_at_per_time() -> None:
    import random

    rng = random.Random(1)
    for sorted_times in (True, False):
        runs = []
        for streamed in (False, True):
            rng.seed(7)
            loop = EventLoop(start_s=1.0)
            seen: list[tuple[float, str]] = []

            def other(tag: str, loop: EventLoop = loop, seen: list = seen) -> None:
                seen.append((loop.now, tag))
                if rng.random() < 0.5:  # events scheduled while the stream runs
                    loop.after(rng.choice((0.0, 0.5, 1.0)), other, tag + "'")

            times = [round(rng.uniform(0, 5) * 2) / 2 for _ in range(30)]  # ties, some past
            if sorted_times:
                times.sort()
            loop.at(2.0, other, "x")
            loop.at(0.0, other, "y")
            args = [(f"a{i}",) for i in range(len(times))]
            if streamed:
                loop.at_each(times, other, args)
            else:
                for t, a in zip(times, args, strict=True):
                    loop.at(t, other, *a)
            loop.at(2.0, other, "z")
            assert len(loop) == len(times) + 3
            loop.run(until_s=3.0)
            pending = len(loop)
            loop.run()
            runs.append((seen, pending, loop.processed))
        assert runs[0] == runs[1]
