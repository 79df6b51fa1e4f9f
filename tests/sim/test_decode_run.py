"""DecodeRun's closed forms against their step-by-step definitions."""

from __future__ import annotations

import random

import pytest

from strata.sim.decode_run import DecodeRun


def _blocks_by_definition(slack: list[int], bs: int, j: int) -> int:
    return sum(-(-(j - r) // bs) for r in slack if j > r)


@pytest.mark.parametrize("bs", [1, 2, 16])
def test_blocks_needed_matches_the_sum_over_sequences(bs: int) -> None:
    rng = random.Random(bs)
    for _ in range(200):
        slack = [rng.randint(0, bs) for _ in range(rng.randrange(0, 40))]
        run = DecodeRun(0.0, 0.02, 1e-5, 10_000, [], slack, bs, 0)
        for j in list(range(0, 3 * bs + 3)) + [rng.randrange(1, 5000) for _ in range(20)]:
            assert run.blocks_needed(j) == _blocks_by_definition(run.slack, bs, j)
        odd = DecodeRun(0.0, 0.02, 0.0, 100, [], slack + [bs + 3, 2 * bs], bs, 0)
        for j in range(0, 4 * bs):  # outside [0, bs]: the plain sum
            assert odd.blocks_needed(j) == _blocks_by_definition(odd.slack, bs, j)
        step = rng.randrange(1, 3 * bs + 2)
        run.shift_slack(step)  # values stay in [0, bs] and the counts follow them
        assert all(0 <= r <= bs for r in run.slack)
        for j in range(0, 3 * bs + 3):
            assert run.blocks_needed(j) == _blocks_by_definition(run.slack, bs, j)


def test_steps_done_is_the_last_step_ended_by_then() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.uniform(1e-3, 0.05), rng.choice([0.0, rng.uniform(0, 1e-4)])
        run = DecodeRun(0.0, a, b, rng.randrange(1, 400), [], [], 16, 0)
        for elapsed in [rng.uniform(-1, 30) for _ in range(10)] + [run.time_of(3)]:
            expect = max((j for j in range(run.k + 1) if run.time_of(j) <= elapsed),
                         default=0) if elapsed > 0 else 0
            assert run.steps_done(elapsed) == expect
