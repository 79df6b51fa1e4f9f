from __future__ import annotations

import math

from strata.gateway.ratelimit import Limits, RateLimiter


def test_requests_per_minute_with_retry_after() -> None:
    rl = RateLimiter()
    lim = Limits(rpm=3)
    assert all(rl.check("k", lim, 10, now=0.0).allowed for _ in range(3))
    v = rl.check("k", lim, 10, now=0.0)
    assert not v.allowed and v.limit == "rpm"
    assert v.retry_after_s == 20.0  # one request refills in 60/3 s
    assert not rl.check("k", lim, 10, now=19.0).allowed
    assert rl.check("k", lim, 10, now=20.0).allowed
    assert rl.check("other", lim, 10, now=0.0).allowed  # per client


def test_tokens_per_minute_takes_both_or_neither() -> None:
    rl = RateLimiter()
    lim = Limits(rpm=100, tpm=1000)
    assert rl.check("k", lim, 800, now=0.0).allowed
    v = rl.check("k", lim, 300, now=0.0)
    assert not v.allowed and v.limit == "tpm"
    assert v.retry_after_s == 6.0  # 100 tokens short at 1000/60 per s
    # The refused request took no request allowance either.
    assert rl.check("k", Limits(rpm=100, tpm=1000), 200, now=0.0).allowed


def test_a_request_larger_than_the_minute_never_fits() -> None:
    v = RateLimiter().check("k", Limits(tpm=100), 101, now=0.0)
    assert not v.allowed and math.isinf(v.retry_after_s)


def test_unlimited_and_forgetting() -> None:
    rl = RateLimiter(max_clients=2)
    assert rl.check("k", Limits(), 10**9, now=0.0).allowed
    for c in ("a", "b", "c"):
        rl.check(c, Limits(rpm=1), 1, now=0.0)
    assert rl.check("a", Limits(rpm=1), 1, now=0.0).allowed  # "a" was forgotten
    assert not rl.check("c", Limits(rpm=1), 1, now=0.0).allowed
