"""The autoscaler's control loop: observe -> decide (a pure policy) -> actuate (platform).

Each period (15 s by default, as the HPA controller's sync period; down to 1 s) every
autoscaled tier is observed (``strata.autoscale.observe``), its policy decides, and the
platform is asked for the decided count. The loop owns the clock; policies only see the
``now`` it passes. Every decision is kept (the last ``history`` for ``strata status``),
logged, optionally appended to a JSON-lines file, and exported as gauges:
``strata_autoscaler_desired_replicas``, ``strata_autoscaler_current_replicas`` and
``strata_autoscaler_metric{name=...}``, each labelled with the tier and the policy.

The loop survives bad signals and its own parts' failures: a tier whose state cannot be
observed (``ObservationError``: Prometheus down, NaN, a wrong answer shape), whose policy
raises, or whose scale request fails is skipped for this tick, logged when the reason
changes (with the traceback when it is not an ``ObservationError``) and counted in
``strata_autoscaler_skipped_ticks{tier,stage}``; the other tiers and later ticks go on.

The activator path (``activate``) is the one exception to the period: a request held
for a tier at zero replicas asks for one replica at once, as Knative's activator pokes its
autoscaler, and the decision is recorded like the policy's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from strata.autoscale.observe import ObservationError
from strata.autoscale.types import AutoscalingPolicy, ScaleDecision, TierState
from strata.platform.base import Platform

log = logging.getLogger("strata.autoscaler")

# Crashes in a row after which a held request stops waiting for the replica (the gateway
# answers 503 at once rather than at the end of its hold).
CRASH_LOOP_STREAK = 3


class TierObserver(Protocol):
    """Anything that can build a tier's state (``strata.autoscale.observe.Observer``)."""

    async def observe(self, tier: str, now: float) -> TierState:
        """The tier's state at ``now``; ObservationError when it cannot be read."""
        ...


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """A decision as kept, logged and shown: the policy's answer plus where and when."""

    decision: ScaleDecision
    wall_time: float  # Unix time, for people
    source: str  # where the signals came from: metrics, prometheus, activator

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (one line of the decision log)."""
        return {"time": self.wall_time, "source": self.source, **self.decision.to_dict()}


class AutoscalerMetrics:
    """The loop's Prometheus series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Register every series in ``registry`` (the gateway's /metrics page serves it)."""
        labels = ["tier", "policy"]
        self.desired = Gauge("strata_autoscaler_desired_replicas",
                             "Replicas the last decision asked for.", labels, registry=registry)
        self.current = Gauge("strata_autoscaler_current_replicas",
                             "Replicas asked of the platform before the last decision.", labels,
                             registry=registry)
        self.metric = Gauge("strata_autoscaler_metric",
                            "Metric values and proposals behind the last decision.",
                            [*labels, "name"], registry=registry)
        self.scale_events = Counter("strata_autoscaler_scale_events",
                                    "Decisions that changed the replica count.",
                                    [*labels, "direction"], registry=registry)
        self.errors = Counter("strata_autoscaler_observe_errors",
                              "Ticks whose tier state could not be observed.", ["tier"],
                              registry=registry)
        self.skipped = Counter("strata_autoscaler_skipped_ticks",
                               "Ticks with no decision for a tier, by the stage that failed "
                               "(observe, decide, actuate).", ["tier", "stage"],
                               registry=registry)
        self._names: dict[tuple[str, str], set[str]] = {}

    def forget(self, tier: str) -> None:
        """Remove every series of a tier that is gone."""
        for tier_, policy in [k for k in self._names if k[0] == tier]:
            for name in self._names.pop((tier_, policy)):
                self.metric.remove(tier, policy, name)
            for gauge in (self.desired, self.current):
                with contextlib.suppress(KeyError):
                    gauge.remove(tier, policy)
            for direction in ("up", "down"):
                with contextlib.suppress(KeyError):
                    self.scale_events.remove(tier, policy, direction)
        with contextlib.suppress(KeyError):
            self.errors.remove(tier)
        for stage in ("observe", "decide", "actuate"):
            with contextlib.suppress(KeyError):
                self.skipped.remove(tier, stage)

    def export(self, d: ScaleDecision) -> None:
        """Set the gauges from one decision; metric names it no longer reports are removed."""
        self.desired.labels(d.tier, d.policy).set(d.desired)
        self.current.labels(d.tier, d.policy).set(d.current)
        key = (d.tier, d.policy)
        for gone in self._names.get(key, set()) - set(d.metrics):
            self.metric.remove(d.tier, d.policy, gone)
        self._names[key] = set(d.metrics)
        for name, value in d.metrics.items():
            self.metric.labels(d.tier, d.policy, name).set(value)
        if d.desired != d.current:
            self.scale_events.labels(d.tier, d.policy,
                                     "up" if d.desired > d.current else "down").inc()


class Autoscaler:
    """One control loop over every autoscaled tier of a platform."""

    def __init__(self, platform: Platform, observer: TierObserver,
                 policies: dict[str, AutoscalingPolicy], *, period_s: float = 15.0,
                 max_replicas: dict[str, int] | None = None, source: str = "metrics",
                 registry: CollectorRegistry | None = None, history: int = 50,
                 decision_log: Path | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        """``policies``: one fresh policy per autoscaled tier (tiers without one stay fixed).

        ``max_replicas`` bounds what the activator may ask for (default 1 per tier).
        """
        if period_s < 1.0:
            raise ValueError(f"autoscaler period_s must be >= 1 s, got {period_s}")
        self.platform = platform
        self.observer = observer
        self.policies = policies
        self.period_s = period_s
        self.max_replicas = max_replicas or {}
        self.source = source
        self.metrics = AutoscalerMetrics(registry or CollectorRegistry())
        self.decision_log = decision_log
        self.clock = clock
        self.wall_clock = wall_clock
        self._history: deque[DecisionRecord] = deque(maxlen=history)
        self._last_error: dict[str, str] = {}

    # -- one reconcile --------------------------------------------------------------------

    async def tick(self) -> list[ScaleDecision]:
        """Observe, decide and actuate every autoscaled tier once; returns the decisions.

        A tier that fails at any stage is skipped (see the module docstring); only
        cancellation propagates.
        """
        now = self.clock()
        tiers = list(self.policies)
        states = await asyncio.gather(*(self.observer.observe(t, now) for t in tiers),
                                      return_exceptions=True)
        decisions: list[ScaleDecision] = []
        for tier, state in zip(tiers, states, strict=True):
            if isinstance(state, asyncio.CancelledError):
                raise state
            if isinstance(state, BaseException):
                self.metrics.errors.labels(tier).inc()
                self._skip(tier, "observe", state)
                continue
            if tier not in self.policies:
                continue  # removed while this tick observed it
            try:
                decision = self.policies[tier].decide(state, now)
            except Exception as err:  # noqa: BLE001 - one tier's policy must not stop the loop
                self._skip(tier, "decide", err)
                continue
            asked = self.platform.desired(tier)
            if asked != state.current_replicas:
                # The activator changed the count while this tick observed: the decision
                # was made on a stale state, so it is recorded but not applied.
                decision = replace(decision, reason=f"{decision.reason}; not applied: "
                                   f"replicas changed to {asked} during the tick")
                self._record(decision, self.source, applied=False)
            else:
                try:
                    await self._apply(decision, self.source)
                except Exception as err:  # noqa: BLE001 - the platform may fail; retry next tick
                    self._skip(tier, "actuate", err)
                    continue
            self._last_error.pop(tier, None)
            decisions.append(decision)
        return decisions

    def _skip(self, tier: str, stage: str, err: BaseException) -> None:
        """Count and log a tier's skipped tick (the log only when the reason changes)."""
        self.metrics.skipped.labels(tier, stage).inc()
        why = str(err) if isinstance(err, ObservationError) else f"{type(err).__name__}: {err}"
        if self._last_error.get(tier) != why:
            if isinstance(err, ObservationError):
                log.warning("tier %s: cannot observe, no decision this tick: %s", tier, why)
            else:
                log.error("tier %s: %s failed, no decision this tick: %s", tier, stage, why,
                          exc_info=err)
        self._last_error[tier] = why

    def remove_tier(self, tier: str) -> None:
        """Stop autoscaling a tier that is gone and drop everything kept about it."""
        self.policies.pop(tier, None)
        self.max_replicas.pop(tier, None)
        self._last_error.pop(tier, None)
        self.metrics.forget(tier)
        forget = getattr(self.observer, "forget", None)
        if forget is not None:
            forget(tier)

    async def _apply(self, decision: ScaleDecision, source: str) -> None:
        if decision.desired != self.platform.desired(decision.tier):
            await self.platform.scale(decision.tier, decision.desired)
        self._record(decision, source)

    def _record(self, d: ScaleDecision, source: str, applied: bool = True) -> None:
        record = DecisionRecord(d, self.wall_clock(), source)
        self._history.append(record)
        if applied:
            self.metrics.export(d)
        metrics = " ".join(f"{k}={v:.3g}" for k, v in sorted(d.metrics.items()))
        level = logging.INFO if d.desired != d.current else logging.DEBUG
        log.log(level, "tier %s [%s]: %d -> %d: %s | %s", d.tier, d.policy, d.current,
                d.desired, d.reason, metrics)
        if self.decision_log is not None:
            with self.decision_log.open("a") as f:
                f.write(json.dumps(record.to_dict()) + "\n")

    async def run(self) -> None:
        """Tick every ``period_s`` until cancelled (a slow tick delays, never overlaps)."""
        next_at = self.clock()
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the loop outlives any one tick's failure
                log.exception("autoscaler tick failed; trying again next period")
            next_at += self.period_s
            delay = next_at - self.clock()
            if delay < 0:  # fell behind: start again from now rather than burst
                next_at = self.clock()
                delay = 0.0
            await asyncio.sleep(delay)

    # -- activation -----------------------------------------------------------------------

    async def activate(self, tier: str, timeout_s: float) -> None:
        """Bring a tier at zero to one ready replica (the gateway's activator hook).

        Raises RuntimeError when the tier may not grow, its replicas are crash-looping, or
        none is ready within ``timeout_s``; the gateway turns that into a 503.
        """
        if self.platform.desired(tier) == 0:
            limit = self.max_replicas.get(tier, 1)
            if limit < 1:
                raise RuntimeError(f"tier {tier!r} has max_replicas 0")
            policy = self.policies.get(tier)
            d = ScaleDecision(tier=tier, current=0, desired=1,
                              policy=policy.name if policy is not None else "fixed",
                              reason="activator: request held for a tier at zero replicas",
                              at=self.clock())
            await self._apply(d, "activator")
        deadline = self.clock() + timeout_s
        while not self.platform.endpoints(tier):
            replicas = self.platform.replicas(tier)
            looping = [r for r in replicas
                       if r.phase == "backoff" and r.crash_streak >= CRASH_LOOP_STREAK]
            if looping and not any(r.phase in ("starting", "ready") for r in replicas):
                r = looping[0]
                raise RuntimeError(f"replica {r.replica_id} keeps crashing ({r.crash_streak} "
                                   f"times in a row, last: {r.last_exit}); see its log")
            remaining = deadline - self.clock()
            if remaining <= 0:
                why = "; ".join(f"{r.replica_id} {r.phase}" + (f" ({r.last_exit})"
                                                              if r.last_exit else "")
                                for r in replicas)
                raise RuntimeError(f"no replica of tier {tier!r} became ready within "
                                   f"{timeout_s:g} s" + (f": {why}" if why else ""))
            await self.platform.wait_changed(min(remaining, 1.0))

    # -- views ------------------------------------------------------------------------------

    def recent(self, limit: int | None = None) -> list[DecisionRecord]:
        """The most recent decisions, oldest first."""
        items = list(self._history)
        return items if limit is None else items[-limit:]

    def last_error(self, tier: str) -> str | None:
        """Why the tier's last tick could not observe it, if it could not."""
        return self._last_error.get(tier)
