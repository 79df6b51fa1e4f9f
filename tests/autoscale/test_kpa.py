"""Knative KPA: stable/panic windows, panic entry and exit, rate limits, bounds, zero."""

from __future__ import annotations

from strata.autoscale.kpa import KpaConfig, KpaPolicy
from strata.autoscale.types import TierState
from tests.autoscale.autoscale_helpers import replica

TICK = 2.0  # Knative's decider tick


def tier(ready: int, concurrency: int, *, current: int | None = None, **kw: object) -> TierState:
    reps = tuple(replica(f"r{i}", kv=0.0) for i in range(ready))
    return TierState(
        tier="t",
        current_replicas=ready if current is None else current,
        replicas=reps,
        in_flight_requests=concurrency,
        **kw,  # type: ignore[arg-type]
    )


def run(policy: KpaPolicy, start: float, end: float, state_at) -> list:
    out = []
    t = start
    while t <= end + 1e-9:
        out.append(policy.decide(state_at(t), t))
        t += TICK
    return out


def test_defaults_are_knatives() -> None:
    cfg = KpaConfig()
    assert cfg.target_value == 70.0 and cfg.total_value == 100.0
    assert cfg.stable_window_s == 60.0 and cfg.panic_window_s == 6.0
    assert cfg.panic_threshold_percentage == 200.0
    assert (cfg.max_scale_up_rate, cfg.max_scale_down_rate) == (1000.0, 2.0)
    assert cfg.min_replicas == 0 and cfg.max_replicas is None
    assert cfg.scale_to_zero_grace_s == 30.0
    assert KpaConfig(metric="rps").target_value == 140.0


def test_stable_mode_is_ceil_of_window_average_over_target() -> None:
    p = KpaPolicy(KpaConfig())
    # Two ready replicas at start: the first stable window is spent in (restart) panic.
    decisions = run(p, 0.0, 64.0, lambda t: tier(2, 200))
    d = decisions[-1]
    # ceil(200 / 70) = 3; the panic proposal 3 is below 200 % of the 2 ready replicas.
    assert d.desired == 3 and d.metrics["stable_concurrency"] == 200.0
    assert d.metrics["panic"] == 0.0 and "stable mode" in d.reason


def test_panic_entry_on_burst_and_no_scale_down_while_panicking() -> None:
    p = KpaPolicy(KpaConfig())
    run(p, 0.0, 64.0, lambda t: tier(2, 100))  # steady at 2, past the restart panic
    assert not p.panicking
    # Burst to 700: the 6 s panic window holds 100, 100, 700 -> 300; ceil(300/70) = 5,
    # which is >= 200 % of the 2 ready replicas.
    d = p.decide(tier(2, 700), 66.0)
    assert p.panicking and "entering panic" in d.reason
    assert d.desired == 5 and d.metrics["desired_stable"] == 2.0
    # Load disappears: the count must not go down while panicking.
    for t in (68.0, 80.0, 100.0, 126.0):
        assert p.decide(tier(5, 0), t).desired == 5
    # Panic ends one stable window after the last time over the threshold (t=66).
    d = p.decide(tier(5, 0), 128.0)
    assert not p.panicking and "leaving panic" in d.reason
    assert d.desired < 5


def test_panic_is_extended_while_over_threshold() -> None:
    p = KpaPolicy(KpaConfig())
    p.decide(tier(1, 0), 0.0)
    p.decide(tier(1, 500), 2.0)  # panic window average 250: ceil(250/70) = 4 >= 2 x 1
    assert p.panic_since == 2.0
    p.decide(tier(8, 1200), 50.0)  # ceil(1200/70) = 18 >= 2 x 8: panic extended to t=50
    assert p.panic_since == 50.0
    d = p.decide(tier(20, 0), 109.0)  # under the threshold, but 50 + 60 is not yet past
    assert p.panicking and d.metrics["panic"] == 1.0 and d.desired == 18
    p.decide(tier(20, 0), 111.0)
    assert not p.panicking


def test_max_scale_down_rate_halves_at_most() -> None:
    p = KpaPolicy(KpaConfig())
    # Idle from the start: the restart panic keeps 10 for one stable window ...
    assert {d.desired for d in run(p, 0.0, 60.0, lambda t: tier(10, 0))} == {10}
    # ... then the stable proposal 0 is limited to floor(10 / 2).
    assert p.decide(tier(10, 0), 62.0).desired == 5


def test_max_scale_up_rate() -> None:
    p = KpaPolicy(KpaConfig(max_scale_up_rate=2.0))
    d = p.decide(tier(2, 10_000), 0.0)
    assert d.desired == 4  # ceil(2 * 2)


def test_new_autoscaler_starts_in_panic_with_more_than_one_ready_replica() -> None:
    p = KpaPolicy(KpaConfig())
    d = p.decide(tier(6, 0), 0.0)
    assert p.panicking and d.desired == 6  # keeps the count it found
    q = KpaPolicy(KpaConfig())
    q.decide(tier(1, 0), 0.0)
    assert not q.panicking


def test_scale_down_delay_holds_the_highest_recent_count() -> None:
    # A high panic threshold keeps this test on the stable path.
    p = KpaPolicy(KpaConfig(scale_down_delay_s=30.0, panic_threshold_percentage=1000))
    assert p.decide(tier(1, 280), 0.0).desired == 4
    d = p.decide(tier(4, 0), 10.0)
    assert d.desired == 4 and "scale-down delayed" in d.reason
    assert p.decide(tier(4, 0), 31.0).desired < 4


def test_bounds_apply_after_the_decider() -> None:
    p = KpaPolicy(KpaConfig(min_replicas=2, max_replicas=3))
    assert p.decide(tier(1, 10_000), 0.0).desired == 3
    q = KpaPolicy(KpaConfig(min_replicas=2))
    assert q.decide(tier(1, 0), 0.0).desired == 2


def test_activator_requests_scale_from_zero() -> None:
    p = KpaPolicy(KpaConfig())
    state = TierState(tier="t", current_replicas=0, pending_requests=1)
    d = p.decide(state, 0.0)
    assert d.desired == 1


def test_scale_to_zero_after_stable_window_and_grace() -> None:
    p = KpaPolicy(KpaConfig())
    run(p, 0.0, 20.0, lambda t: tier(1, 10, last_request_at=t))
    # Traffic stops at t=20. The stable average reaches 0 once the window holds only
    # idle samples (t > 80); then the grace period (30 s) must pass.
    decisions = run(p, 22.0, 200.0, lambda t: tier(1, 0, last_request_at=20.0))
    first_zero = next(d.at for d in decisions if d.desired == 0)
    assert 80.0 + 30.0 <= first_zero <= 80.0 + 30.0 + 2 * TICK


def test_rps_metric() -> None:
    p = KpaPolicy(KpaConfig(metric="rps"))
    reps = tuple(replica(f"r{i}", kv=0.0) for i in range(2))
    state = TierState(tier="t", current_replicas=2, replicas=reps, arrival_rate_rps=420.0)
    d = p.decide(state, 0.0)
    assert d.desired == 3 and d.metrics["stable_rps"] == 420.0
