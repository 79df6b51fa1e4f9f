"""The control loop: observe -> decide -> actuate, decision records, gauges and activation."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from strata.autoscale.hpa import HpaConfig, HpaMetric, HpaPolicy
from strata.autoscale.llm import LlmConfig, LlmPolicy
from strata.autoscale.loop import Autoscaler
from strata.autoscale.observe import ObservationError
from strata.autoscale.types import TierState
from strata.platform.base import Endpoint, Replica
from tests.autoscale.autoscale_helpers import replica


class MemoryPlatform:
    """A Platform whose replicas become ready when the test says so."""

    def __init__(self) -> None:
        self.wanted: dict[str, int] = {"engine": 1}
        self.ready: list[Endpoint] = []
        self.crashed = 0  # crashes in a row
        self.calls: list[tuple[str, int]] = []
        self._changed = asyncio.Event()

    async def scale(self, tier: str, replicas: int) -> None:
        self.calls.append((tier, replicas))
        self.wanted[tier] = replicas

    def endpoints(self, tier: str) -> list[Endpoint]:
        return list(self.ready)

    async def drain(self, replica_id: str) -> None:
        raise NotImplementedError

    def desired(self, tier: str) -> int:
        return self.wanted[tier]

    def replicas(self, tier: str) -> list[Replica]:
        phase = "backoff" if self.crashed else ("ready" if self.ready else "starting")
        return [Replica(tier, f"{tier}-{i}", phase, None, 0.0,  # type: ignore[arg-type]
                        last_exit="exited with status 1" if self.crashed else "",
                        crash_streak=self.crashed)
                for i in range(self.wanted[tier])]

    async def wait_changed(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass

    async def close(self) -> None:
        pass

    def make_ready(self) -> None:
        self.ready = [Endpoint("engine", "engine-0", "http://127.0.0.1:1")]
        self._changed.set()
        self._changed = asyncio.Event()


class ScriptedObserver:
    """Returns the tier states (or errors) it was given, one per call."""

    def __init__(self, *states: TierState | Exception) -> None:
        self.states = list(states)
        self.calls: list[float] = []

    async def observe(self, tier: str, now: float) -> TierState:
        self.calls.append(now)
        item = self.states.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def busy(current: int, kv: float) -> TierState:
    return TierState(tier="engine", current_replicas=current,
                     replicas=tuple(replica(f"r{i}", kv=kv) for i in range(current)))


def hpa(max_replicas: int = 4) -> HpaPolicy:
    return HpaPolicy(HpaConfig(max_replicas=max_replicas, metrics=(
        HpaMetric(name="kv_usage", type="Utilization", average_utilization=50),)))


def make(platform: MemoryPlatform, observer: ScriptedObserver, registry: CollectorRegistry,
         tmp_path: Path | None = None, **kw: object) -> Autoscaler:
    times = iter(range(1000, 100_000, 15))
    clock = kw.pop("clock", lambda: float(next(times)))
    return Autoscaler(platform, observer, {"engine": kw.pop("policy", hpa())},  # type: ignore[arg-type]
                      period_s=15, registry=registry, clock=clock,  # type: ignore[arg-type]
                      wall_clock=lambda: 1.7e9,
                      decision_log=None if tmp_path is None else tmp_path / "d.jsonl", **kw)  # type: ignore[arg-type]


def gauge(registry: CollectorRegistry, series: str, **labels: str) -> float | None:
    return registry.get_sample_value(series, labels)


async def test_tick_decides_actuates_records_and_exports(tmp_path: Path) -> None:
    platform, registry = MemoryPlatform(), CollectorRegistry()
    loop = make(platform, ScriptedObserver(busy(1, 0.9)), registry, tmp_path)
    [d] = await loop.tick()
    assert (d.current, d.desired, d.policy) == (1, 2, "hpa")  # ceil(1 * 90 / 50)
    assert platform.calls == [("engine", 2)]
    assert gauge(registry, "strata_autoscaler_desired_replicas", tier="engine", policy="hpa") == 2
    assert gauge(registry, "strata_autoscaler_current_replicas", tier="engine", policy="hpa") == 1
    assert gauge(registry, "strata_autoscaler_metric", tier="engine", policy="hpa",
                 name="kv_usage") == 90
    assert gauge(registry, "strata_autoscaler_scale_events_total", tier="engine", policy="hpa",
                 direction="up") == 1
    [rec] = loop.recent()
    assert rec.source == "metrics" and rec.decision is d
    line = json.loads((tmp_path / "d.jsonl").read_text())
    assert line["desired"] == 2 and line["metrics"]["kv_usage"] == 90 and line["time"] == 1.7e9


async def test_hold_is_recorded_but_not_actuated() -> None:
    platform, registry = MemoryPlatform(), CollectorRegistry()
    loop = make(platform, ScriptedObserver(busy(1, 0.5)), registry)
    [d] = await loop.tick()
    assert d.desired == d.current == 1 and platform.calls == []
    assert len(loop.recent()) == 1


async def test_metric_gauges_follow_the_latest_decision() -> None:
    platform, registry = MemoryPlatform(), CollectorRegistry()
    llm = LlmPolicy(LlmConfig(max_replicas=3))
    loop = make(platform, ScriptedObserver(busy(1, 0.5), TierState("engine", 1)), registry,
                policy=llm)
    await loop.tick()
    assert gauge(registry, "strata_autoscaler_metric", tier="engine", policy="llm",
                 name="kv_usage") == 0.5
    await loop.tick()  # no replicas reported: kv_usage is no longer part of the decision
    assert gauge(registry, "strata_autoscaler_metric", tier="engine", policy="llm",
                 name="kv_usage") is None
    assert gauge(registry, "strata_autoscaler_metric", tier="engine", policy="llm",
                 name="waiting") == 0


async def test_a_decision_on_a_state_the_activator_changed_is_not_applied() -> None:
    platform, registry = MemoryPlatform(), CollectorRegistry()
    platform.wanted["engine"] = 0

    class Racing(ScriptedObserver):
        async def observe(self, tier: str, now: float) -> TierState:
            state = TierState("engine", 0)  # idle at zero...
            platform.wanted["engine"] = 1  # ...while a request activates the tier
            return state

    loop = make(platform, Racing(), registry)
    [d] = await loop.tick()
    assert d.desired == 0 and "not applied: replicas changed to 1" in d.reason
    assert platform.calls == [] and platform.desired("engine") == 1
    assert gauge(registry, "strata_autoscaler_desired_replicas", tier="engine",
                 policy="hpa") is None


async def test_unobservable_tier_is_skipped_and_counted() -> None:
    platform, registry = MemoryPlatform(), CollectorRegistry()
    loop = make(platform, ScriptedObserver(ObservationError("prometheus down"), busy(1, 0.9)),
                registry)
    assert await loop.tick() == []
    assert loop.last_error("engine") == "prometheus down"
    assert gauge(registry, "strata_autoscaler_observe_errors_total", tier="engine") == 1
    assert len(await loop.tick()) == 1
    assert loop.last_error("engine") is None


async def test_other_observer_failures_skip_the_tick_with_a_traceback(caplog) -> None:
    """A bug in observation is logged with its traceback and counted; the loop goes on."""
    platform, registry = MemoryPlatform(), CollectorRegistry()
    loop = make(platform, ScriptedObserver(KeyError("bug"), KeyError("bug"), busy(1, 0.9)),
                registry)
    assert await loop.tick() == [] and await loop.tick() == []
    assert loop.last_error("engine") == "KeyError: 'bug'"
    assert gauge(registry, "strata_autoscaler_skipped_ticks_total", tier="engine",
                 stage="observe") == 2
    logged = [r for r in caplog.records if "observe failed" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # once per reason
    assert [d.desired for d in await loop.tick()] == [2]
    assert loop.last_error("engine") is None


class RaisingPolicy:
    """A policy whose decide() fails, as one fed a value it cannot handle might."""

    name = "raising"

    def decide(self, state: TierState, now: float) -> None:
        raise ValueError("cannot convert float NaN to integer")


async def test_a_failing_policy_skips_only_its_tier() -> None:
    platform, registry = MemoryPlatform(), CollectorRegistry()
    platform.wanted["other"] = 1
    other = TierState(tier="other", current_replicas=1,
                      replicas=(replica("o0", kv=0.9),))
    observer = ScriptedObserver(busy(1, 0.9), other)
    loop = Autoscaler(platform, observer, {"engine": RaisingPolicy(), "other": hpa()},  # type: ignore[dict-item]
                      period_s=15, registry=registry, clock=lambda: 1000.0)
    decisions = await loop.tick()
    assert [(d.tier, d.desired) for d in decisions] == [("other", 2)]
    assert "NaN" in (loop.last_error("engine") or "")
    assert gauge(registry, "strata_autoscaler_skipped_ticks_total", tier="engine",
                 stage="decide") == 1


class FailingPlatform(MemoryPlatform):
    async def scale(self, tier: str, replicas: int) -> None:
        raise ConnectionError("API server unavailable")


async def test_a_failing_scale_request_is_retried_next_tick() -> None:
    platform, registry = FailingPlatform(), CollectorRegistry()
    loop = make(platform, ScriptedObserver(busy(1, 0.9), busy(1, 0.9)), registry)
    assert await loop.tick() == []
    assert gauge(registry, "strata_autoscaler_skipped_ticks_total", tier="engine",
                 stage="actuate") == 1
    assert "API server unavailable" in (loop.last_error("engine") or "")
    assert await loop.tick() == []  # tried again, failed again, still running


async def test_run_survives_a_tick_that_raises() -> None:
    """Even a failure outside the per-tier guards leaves the loop ticking."""
    loop = Autoscaler(MemoryPlatform(), ScriptedObserver(), {"engine": hpa()}, period_s=1.0)
    calls: list[float] = []

    async def failing_tick() -> list:
        calls.append(time.monotonic())
        raise RuntimeError("tick bug")

    loop.tick = failing_tick  # type: ignore[method-assign]
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(1.3)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(calls) == 2


async def test_removing_a_tier_drops_its_state_and_series() -> None:
    platform, registry = MemoryPlatform(), CollectorRegistry()
    loop = make(platform, ScriptedObserver(ObservationError("down"), busy(1, 0.9)), registry)
    await loop.tick()
    await loop.tick()
    assert gauge(registry, "strata_autoscaler_desired_replicas", tier="engine",
                 policy="hpa") == 2
    loop.remove_tier("engine")
    assert loop.policies == {} and loop.last_error("engine") is None
    assert await loop.tick() == []
    names = {s.name for m in registry.collect() for s in m.samples
             if s.labels.get("tier") == "engine"}
    assert names == set()


async def test_activation_from_zero_asks_for_one_and_waits_for_ready() -> None:
    platform, registry = MemoryPlatform(), CollectorRegistry()
    platform.wanted["engine"] = 0
    loop = make(platform, ScriptedObserver(), registry, max_replicas={"engine": 2},
                clock=time.monotonic)
    task = asyncio.create_task(loop.activate("engine", timeout_s=5))
    await asyncio.sleep(0.05)
    assert platform.calls == [("engine", 1)] and not task.done()
    platform.make_ready()
    await asyncio.wait_for(task, 2)
    [rec] = loop.recent()
    assert rec.source == "activator" and (rec.decision.current, rec.decision.desired) == (0, 1)
    assert "activator" in rec.decision.reason
    await loop.activate("engine", timeout_s=1)  # ready already: nothing more to ask
    assert platform.calls == [("engine", 1)]


async def test_activation_fails_clearly() -> None:
    platform = MemoryPlatform()
    platform.wanted["engine"] = 0
    loop = make(platform, ScriptedObserver(), CollectorRegistry(), max_replicas={"engine": 0},
                clock=time.monotonic)
    with pytest.raises(RuntimeError, match="max_replicas 0"):
        await loop.activate("engine", timeout_s=1)
    loop.max_replicas = {"engine": 1}
    with pytest.raises(RuntimeError, match="became ready within 0.2 s: engine-0 starting"):
        await loop.activate("engine", timeout_s=0.2)
    platform.crashed = 1  # one crash: it is being restarted, keep waiting
    with pytest.raises(RuntimeError, match=r"within 0.2 s: engine-0 backoff \(exited with"):
        await loop.activate("engine", timeout_s=0.2)
    platform.crashed = 3  # crash-looping: give up at once
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"engine-0 keeps crashing \(3 times in a row, "
                       r"last: exited with status 1\)"):
        await loop.activate("engine", timeout_s=5)
    assert time.monotonic() - t0 < 1


async def test_run_ticks_every_period_and_rejects_short_periods() -> None:
    observer = ScriptedObserver(*[busy(1, 0.5) for _ in range(10)])
    loop = Autoscaler(MemoryPlatform(), observer, {"engine": hpa()}, period_s=1.0)
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(1.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(observer.calls) == 2
    assert observer.calls[1] - observer.calls[0] == pytest.approx(1.0, abs=0.3)
    with pytest.raises(ValueError, match="period_s must be >= 1 s"):
        Autoscaler(MemoryPlatform(), observer, {}, period_s=0.5)
