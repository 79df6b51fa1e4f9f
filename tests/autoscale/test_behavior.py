"""HPA behaviour: stabilization windows, Pods/Percent policies with periods, selectPolicy."""

from __future__ import annotations

import pytest

from strata.autoscale.behavior import (
    Behavior,
    Normalizer,
    ScalingPolicy,
    ScalingRules,
    resolve_rules,
)


def rules(**kw: object) -> ScalingRules:
    return ScalingRules.model_validate(kw)


class Target:
    """A scale target whose count follows every decision, as the HPA controller makes it."""

    def __init__(self, normalizer: Normalizer, current: int, now: float = 0.0) -> None:
        self.n = normalizer
        self.current = current
        self.n.record_initial(current, now)

    def step(self, desired: int, now: float, lo: int = 1, hi: int = 1000) -> int:
        out = self.n.normalize(self.current, desired, lo, hi, now)
        if out.desired != self.current:
            self.n.record_scale(self.current, out.desired, now)
            self.current = out.desired
        return out.desired


def test_defaults_when_behavior_is_present_match_the_api_defaults() -> None:
    up, down = resolve_rules(Behavior())
    assert up.stabilization_window_s == 0 and up.select_policy == "Max"
    assert {(p.type, p.value, p.period_seconds) for p in up.policies} == {
        ("Pods", 4, 15),
        ("Percent", 100, 15),
    }
    assert down.stabilization_window_s == 300 and down.select_policy == "Max"
    assert [(p.type, p.value, p.period_seconds) for p in down.policies] == [("Percent", 100, 15)]
    assert up.tolerance == down.tolerance == 0.1
    # Unset fields of a partly given block are filled one by one.
    up, down = resolve_rules(Behavior(scale_down=rules(stabilizationWindowSeconds=60)))
    assert down.stabilization_window_s == 60 and down.policies[0].type == "Percent"


def test_default_behavior_scale_up_trajectory() -> None:
    # 100 % or 4 pods per 15 s, whichever is more: 3 -> 7 -> 14 -> 28 -> 40 (max).
    t = Target(Normalizer(Behavior()), 3)
    seen = [t.step(100, now, hi=40) for now in (0.0, 15.1, 30.2, 45.3, 60.4)]
    assert seen == [7, 14, 28, 40, 40]


def test_scale_up_period_uses_the_event_history() -> None:
    t = Target(Normalizer(Behavior()), 1)
    assert t.step(10, 0.0) == 5  # max(1 + 4, 2 * 1)
    assert t.step(10, 5.0) == 5  # period start is 1 again: no more this period
    assert t.step(10, 14.9) == 5
    # An event exactly one period old no longer counts (it must be strictly after the
    # cutoff): new period, max(5 + 4, 2 * 5) = 10.
    assert t.step(10, 15.0) == 10


def test_legacy_path_without_behavior() -> None:
    # No behavior: scale-up limited per decision to max(2 * current, 4), no periods.
    n = Normalizer(None)
    n.record_initial(1, 0.0)
    out = n.normalize(1, 10, 1, 100, 0.0)
    assert (out.desired, out.limit) == (4, "ScaleUpLimit")
    assert n.normalize(4, 10, 1, 100, 1.0).desired == 8
    assert n.normalize(3, 10, 1, 5, 2.0).desired == 5  # TooManyReplicas wins at max 5
    assert n.normalize(3, 10, 1, 5, 2.0).limit == "TooManyReplicas"
    # ... whereas the default *behavior* allows 1 -> 5.
    b = Normalizer(Behavior())
    b.record_initial(1, 0.0)
    assert b.normalize(1, 10, 1, 100, 0.0).desired == 5


def test_legacy_downscale_stabilization_takes_highest_recent_recommendation() -> None:
    n = Normalizer(None, downscale_stabilization_s=300)
    n.record_initial(5, 0.0)
    assert n.normalize(5, 2, 1, 10, 100.0).desired == 5
    assert n.normalize(5, 2, 1, 10, 300.0).desired == 5  # the t=0 sample is exactly at cutoff
    out = n.normalize(5, 2, 1, 10, 300.5)
    assert out.desired == 2 and out.stabilization == "ReadyForNewScale"
    assert n.normalize(5, 1, 1, 10, 301.0).stabilization == "ScaleDownStabilized"


def test_scale_down_stabilization_window_picks_max_over_window() -> None:
    b = Behavior(scale_down=rules(stabilizationWindowSeconds=60))
    t = Target(Normalizer(b), 10)
    assert t.step(4, 10.0) == 10  # the initial recommendation (10 at t=0) is in the window
    assert t.step(6, 20.0) == 10
    assert t.step(3, 30.0) == 10
    assert t.step(3, 60.5) == 6  # 10 at t=0 left the window; 6 at t=20 is the highest
    assert t.step(3, 80.5) == 3  # 6 left; the rest are 3 (and 4 at t=10 left at 70)


def test_scale_up_stabilization_window_picks_min_over_window() -> None:
    b = Behavior(scale_up=rules(stabilizationWindowSeconds=60))
    t = Target(Normalizer(b), 2)
    assert t.step(6, 10.0) == 2  # the lowest recent recommendation is the initial 2
    assert t.step(8, 30.0) == 2
    assert t.step(8, 60.5) == 6  # 2 at t=0 left the window; lowest is 6 (t=10)
    assert t.step(8, 70.5) == 6  # stabilized to 8, but 2 -> 6 used this 15 s period's 4 pods
    assert t.step(8, 75.6) == 8


def test_docs_example_percent_and_pods_scale_down() -> None:
    # Kubernetes docs: Pods 4 / 60 s and Percent 10 / 60 s; default selectPolicy Max picks
    # the larger change: 10 % while above 40 replicas, 4 pods below.
    policies = (
        ScalingPolicy(type="Pods", value=4, period_seconds=60),
        ScalingPolicy(type="Percent", value=10, period_seconds=60),
    )
    b = Behavior(scale_down=ScalingRules(stabilization_window_seconds=0, policies=policies))
    t = Target(Normalizer(b), 80)
    assert t.step(10, 0.0, lo=10) == 72  # 8 pods
    assert t.step(10, 30.0, lo=10) == 72  # the period still counts those 8
    assert t.step(10, 60.5, lo=10) == 64  # 10 % of 72 is 7.2: 8 pods go (64.8 -> 64)
    t2 = Target(Normalizer(b), 30)
    assert t2.step(10, 0.0, lo=10) == 26  # below 40 the Pods policy allows more


def test_select_policy_min_limits_to_the_smaller_change() -> None:
    # Docs: at most 10 % and at most 5 pods per minute.
    policies = (
        ScalingPolicy(type="Percent", value=10, period_seconds=60),
        ScalingPolicy(type="Pods", value=5, period_seconds=60),
    )
    b = Behavior(
        scale_down=ScalingRules(
            stabilization_window_seconds=0, policies=policies, select_policy="Min"
        )
    )
    assert Target(Normalizer(b), 80).step(1, 0.0) == 75  # 5 pods < 8 pods
    assert Target(Normalizer(b), 40).step(1, 0.0) == 36  # 4 pods < 5 pods


def test_select_policy_min_on_scale_up() -> None:
    b = Behavior(scale_up=rules(selectPolicy="Min"))
    assert Target(Normalizer(b), 10).step(100, 0.0) == 14  # min(10 + 4, 20)


@pytest.mark.parametrize("direction", ["scale_up", "scale_down"])
def test_select_policy_disabled(direction: str) -> None:
    b = Behavior.model_validate(
        {direction: {"selectPolicy": "Disabled", "stabilizationWindowSeconds": 0}}
    )
    t = Target(Normalizer(b), 5)
    out = t.n.normalize(5, 50 if direction == "scale_up" else 1, 1, 100, 0.0)
    assert out.desired == 5
    assert out.limit == ("ScaleUpLimit" if direction == "scale_up" else "ScaleDownLimit")


def test_percent_scale_up_rounds_up_and_scale_down_rounds_down() -> None:
    up = Behavior(scale_up=rules(policies=[{"type": "Percent", "value": 10, "periodSeconds": 60}]))
    assert Target(Normalizer(up), 3).step(10, 0.0) == 4  # ceil(3.3): always at least one
    down = Behavior(
        scale_down=rules(
            stabilizationWindowSeconds=0,
            policies=[{"type": "Percent", "value": 10, "periodSeconds": 60}],
        )
    )
    assert Target(Normalizer(down), 3).step(1, 0.0) == 2  # int(2.7) = 2


def test_large_percent_scale_up() -> None:
    b = Behavior(scale_up=rules(policies=[{"type": "Percent", "value": 900, "periodSeconds": 60}]))
    assert Target(Normalizer(b), 1).step(50, 0.0) == 10


def test_scale_down_events_widen_the_next_scale_up() -> None:
    # Removing replicas within a scale-up period lowers nothing: the period starts from
    # current - added + removed, so after 10 -> 6 a scale-up may go to max(10 + 4, 20).
    b = Behavior(
        scale_up=rules(policies=[{"type": "Pods", "value": 4, "periodSeconds": 60}]),
        scale_down=rules(stabilizationWindowSeconds=0),
    )
    t = Target(Normalizer(b), 10)
    assert t.step(6, 0.0) == 6
    assert t.step(20, 10.0) == 14  # start 6 + 4 removed = 10, + 4 pods


def test_min_and_max_clamp_after_rates() -> None:
    t = Target(Normalizer(Behavior(scale_down=rules(stabilizationWindowSeconds=0))), 5)
    out = t.n.normalize(5, 1, 3, 10, 0.0)
    assert (out.desired, out.limit) == (3, "TooFewReplicas")
    out = t.n.normalize(5, 50, 1, 8, 1.0)
    assert (out.desired, out.limit) == (8, "TooManyReplicas")


def test_tolerances_come_from_behavior_or_the_controller() -> None:
    assert Normalizer(None, tolerance=0.2).tolerances.scale_up == 0.2
    b = Behavior(scale_up=rules(tolerance=0.0), scale_down=rules(tolerance=0.05))
    tol = Normalizer(b).tolerances
    assert (tol.scale_up, tol.scale_down) == (0.0, 0.05)


def test_invalid_rules_fail_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="policies"):
        ScalingRules(policies=())
    with pytest.raises(ValueError, match="period_seconds"):
        ScalingPolicy(type="Pods", value=1, period_seconds=0)
    with pytest.raises(ValueError):
        ScalingRules.model_validate({"selectPolicy": "Sometimes"})
