"""The one load meter: window rates, step-time EWMAs and the closed-form decode run."""

from __future__ import annotations

import random

import pytest

from strata.load_meter import EWMA_ALPHA, PREFILL_MIN_TOKENS, WINDOW_S, LoadMeter, ewma_after


def test_rates_count_the_window_over_the_time_since_its_oldest_step() -> None:
    m = LoadMeter()
    m.record(1.0, 0.1, 100, 100, 1)
    m.record(2.0, 0.05, 0, 4, 4)
    assert m.rates(3.0) == (pytest.approx(100 / 2.0), pytest.approx(5 / 2.0))
    # the first step leaves the window; the second is the oldest left
    assert m.rates(1.0 + WINDOW_S + 0.5) == (0.0, pytest.approx(4 / (WINDOW_S - 0.5)))
    assert m.rates(2.0 + WINDOW_S + 0.5) == (0.0, 0.0)
    assert (m.total_prompt_tokens, m.total_generated_tokens) == (100, 5)


def test_a_step_just_recorded_is_rated_over_a_millisecond_not_zero() -> None:
    m = LoadMeter()
    m.record(5.0, 0.01, 0, 2, 2)
    assert m.rates(5.0) == (0.0, pytest.approx(2 / 1e-3))


def test_window_sums_match_the_steps_in_the_window() -> None:
    rng = random.Random(7)
    m = LoadMeter()
    t = 0.0
    for _ in range(2000):
        t += rng.expovariate(20.0)
        m.record(t, 0.01, rng.choice((0, 0, 17, 300)), 8, rng.randint(0, 8))
        if rng.random() < 0.1:
            m.rates(t)
    m.rates(t)
    assert m.window_prompt_tokens == sum(e[1] for e in m.events)
    assert m.window_generated_tokens == sum(e[2] for e in m.events)
    assert all(e[0] >= t - WINDOW_S for e in m.events)


def test_decode_steps_and_large_prefills_update_their_averages() -> None:
    m = LoadMeter()
    m.record(1.0, 0.02, 0, 4, 4)  # decode: seeds the average
    m.record(2.0, 0.04, 0, 4, 4)
    assert m.decode_step_s == pytest.approx((1 - EWMA_ALPHA) * 0.02 + EWMA_ALPHA * 0.04)
    m.record(3.0, 0.5, PREFILL_MIN_TOKENS - 1, PREFILL_MIN_TOKENS + 3, 1)  # too small a prefill
    assert m.prefill_token_s == 0.0
    m.record(4.0, 0.5, 96, 100, 1)  # per token over all 100 tokens the step ran
    assert m.prefill_token_s == pytest.approx(0.005)
    assert m.decode_step_s == pytest.approx((1 - EWMA_ALPHA) * 0.02 + EWMA_ALPHA * 0.04)
    m.record(5.0, 0.0, 0, 0, 0)  # an empty step is no decode step
    assert m.decode_step_s == pytest.approx((1 - EWMA_ALPHA) * 0.02 + EWMA_ALPHA * 0.04)


@pytest.mark.parametrize("seed", [0.0, 0.03])
def test_a_decode_run_in_closed_form_equals_its_steps_one_by_one(seed: float) -> None:
    a, b, j, n = 0.02, 0.0001, 37, 6
    steps, run = LoadMeter(), LoadMeter()
    if seed:
        steps.record(0.5, seed, 0, n, n)
        run.record(0.5, seed, 0, n, n)
    t = 1.0
    for i in range(j):
        t += a + b * i
        steps.record(t, a + b * i, 0, n, n)
    assert run.decode_step_after(a, b, j) == pytest.approx(steps.decode_step_s, rel=1e-12)
    assert run.decode_step_s == seed  # asking changes nothing
    run.record_decode_run(t, t - 1.0, n * j, a, b, j)
    assert run.decode_step_s == pytest.approx(steps.decode_step_s, rel=1e-12)
    assert run.total_generated_tokens == steps.total_generated_tokens
    assert run.total_busy_s == pytest.approx(steps.total_busy_s)
    # tokens of a run in progress count from the end of its oldest step in the window
    first_end = 1.0 + a
    assert LoadMeter().rates(t, n * j, first_end)[1] == pytest.approx(
        (steps.window_generated_tokens - (n if seed else 0)) / (t - first_end))
    assert ewma_after(0.5, 0.1, 0.0, 0) == 0.5


def test_busy_ratio_is_over_the_window_or_the_time_since_start() -> None:
    m = LoadMeter(started=100.0)
    m.record(101.0, 0.5, 0, 1, 1)
    assert m.busy_ratio(102.0) == pytest.approx(0.25)  # 0.5 s busy of 2 s since start
    m.record(150.0, 2.0, 0, 1, 1)
    assert m.busy_ratio(151.0) == pytest.approx(2.0 / WINDOW_S)  # the first left the window
    m.record(151.0, 20.0, 0, 1, 1)
    assert m.busy_ratio(151.0) == 1.0
    assert m.total_busy_s == pytest.approx(22.5)
