"""What ``GET /admin/status`` says about a running cluster, and how ``strata status`` shows it.

The cluster gathers a ``ClusterFacts`` (plain data: platform records, the gateway's load
per replica, the autoscaler's policy names and decisions); this module only shapes it, so
it needs nothing of the gateway's or autoscaler's insides. The payload is plain JSON
(tiers, replicas with their load, recent scaling decisions) so other tools can read it
too; ``render_status`` turns it into three rich tables.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from strata.load import LoadReport
from strata.platform.base import Replica

_DECISIONS_SHOWN = 10
_KEY_METRICS = ("kv_usage", "waiting", "arrival_rate_rps", "forecast_rps", "ttft_p90_s",
                "demand_tokens_per_s", "capacity_tokens_per_s", "concurrency")


@dataclass(frozen=True)
class ReplicaFacts:
    """One replica: the platform's record, the gateway's view and a stage's busy sample."""

    record: Replica
    in_flight: int | None = None  # requests the gateway has sent it and not seen end
    load: LoadReport | None = None  # its last /load report, as the gateway read it
    busy: Any = None  # stage tiers: the stage observer's sample of this replica


@dataclass(frozen=True)
class TierFacts:
    """One tier: its plan's bounds, the autoscaler's policy and the platform's counts."""

    name: str
    kind: str  # engine | stage-head | stage
    layers: str | None
    min_replicas: int
    max_replicas: int
    policy: str  # the autoscaling policy's name, or "fixed"
    desired: int
    ready: int
    last_error: str | None
    replicas: Sequence[ReplicaFacts]


@dataclass(frozen=True)
class ClusterFacts:
    """What the status shows of a running cluster, gathered by the cluster itself."""

    url: str
    uptime_s: float
    routing: str
    source: str  # where the autoscaler reads its signals
    period_s: float
    slos: dict[str, Any]
    tiers: Sequence[TierFacts]
    decisions: list[dict[str, Any]]
    stage_view: dict[str, Any] | None = None  # the head's last GET /stages


def status_payload(facts: ClusterFacts) -> dict[str, Any]:
    """The cluster's state now, JSON-ready."""
    now = time.monotonic()
    stage_reps, kv_blocks = _stage_replicas(facts.stage_view)
    tiers = []
    for t in facts.tiers:
        replicas = []
        for f in t.replicas:
            r = f.record
            if t.kind == "stage":
                replicas.append(_stage_row(r, now, stage_reps.get(r.url or ""), kv_blocks,
                                           f.busy))
                continue
            load = f.load
            replicas.append({
                **_platform_row(r, now),
                "in_flight": f.in_flight,
                "running": load.running if load else None,
                "waiting": load.waiting if load else None,
                "kv_usage": load.kv_usage if load else None,
                "tokens_per_s": (load.prompt_tokens_per_s + load.generation_tokens_per_s)
                if load else None,
            })
        tiers.append({
            "name": t.name, "kind": t.kind, "layers": t.layers, "policy": t.policy,
            "min": t.min_replicas, "max": t.max_replicas, "desired": t.desired,
            "ready": t.ready, "last_error": t.last_error, "replicas": replicas})
    return {
        "url": facts.url, "uptime_s": facts.uptime_s, "routing": facts.routing,
        "source": facts.source, "period_s": facts.period_s, "slos": facts.slos,
        "tiers": tiers, "decisions": facts.decisions,
    }


def _platform_row(r: Replica, now: float) -> dict[str, Any]:
    """What the platform knows of a replica: identity, phase, restarts, age."""
    return {
        "id": r.replica_id, "phase": r.phase, "url": r.url, "pid": r.pid,
        "restarts": r.restarts, "crash_streak": r.crash_streak,
        "age_s": now - r.started_at, "startup_s": r.startup_s,
        "ready_for_s": None if r.ready_at is None else now - r.ready_at,
        "last_exit": r.last_exit,
    }


def _stage_replicas(view: dict[str, Any] | None) -> tuple[dict[str, dict[str, Any]], int]:
    """The head's view of each stage replica, by URL, and the pipeline's KV block count."""
    if not view:
        return {}, 0
    reps = {r["url"]: r for st in view.get("stages", []) for r in st.get("replicas", [])}
    return reps, int(view.get("head", {}).get("kv_blocks", 0))


def _stage_row(r: Replica, now: float, head: dict[str, Any] | None, kv_blocks: int,
               sample: Any) -> dict[str, Any]:
    """A stage replica's row: the platform's facts plus the head's (pins, KV) and busy ratio."""
    from strata.stages.scaling import STAGE_BUSY, STAGE_QUEUE

    extra = sample.extra if sample is not None else {}
    return {
        **_platform_row(r, now),
        "in_flight": head["inflight"] if head else None,  # micro-batches through it
        "running": head["pinned"] if head else None,  # sequences whose KV lives here
        "waiting": extra.get(STAGE_QUEUE),
        "kv_usage": head["used_kv_blocks"] / kv_blocks if head and kv_blocks else None,
        "tokens_per_s": None,
        "head_state": head["state"] if head else None,  # live, draining, down; None: not joined
        "busy": extra.get(STAGE_BUSY),
    }


def _num(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _age(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _phase(r: dict[str, Any]) -> str:
    """A replica's phase, with its last exit unless it is ready again."""
    return r["phase"] if not r["last_exit"] or r["phase"] == "ready" else \
        f"{r['phase']} ({r['last_exit']})"


def _stage_table(t: dict[str, Any]) -> Table:
    """Replicas of a stage tier: the head's view (joined, pins, KV) and the busy ratio."""
    table = Table(title=f"Replicas of stage tier {t['name']} (layers {t['layers']})")
    for col in ("replica", "phase", "address", "pid", "in head"):
        table.add_column(col, no_wrap=True)
    for col in ("restarts", "age", "pinned", "queued", "kv", "busy", "in-flight"):
        table.add_column(col, justify="right")
    for r in t["replicas"]:
        table.add_row(r["id"], _phase(r), (r["url"] or "-").removeprefix("http://"),
                      _num(r["pid"]), r["head_state"] or "-", str(r["restarts"]),
                      _age(r["age_s"]), _num(r["running"]), _num(r["waiting"]),
                      _num(r["kv_usage"], "{:.0%}"), _num(r["busy"], "{:.0%}"),
                      _num(r["in_flight"]))
    return table


def render_status(payload: dict[str, Any], console: Console) -> None:
    """Tiers, replicas and the last scaling decisions as tables."""
    console.print(f"cluster at {payload['url']}, up {_age(payload['uptime_s'])}; routing "
                  f"{payload['routing']}; autoscaler every {payload['period_s']:g} s from "
                  f"{payload['source']}")
    tiers = Table(title="Tiers")
    for col in ("tier", "kind", "layers", "policy", "ready/desired", "min..max", "note"):
        tiers.add_column(col)
    tables = []
    for t in payload["tiers"]:
        tiers.add_row(t["name"], t["kind"], t.get("layers") or "-", t["policy"],
                      f"{t['ready']}/{t['desired']}", f"{t['min']}..{t['max']}",
                      t["last_error"] or "")
        if t["kind"] == "stage":
            tables.append(_stage_table(t))
            continue
        replicas = Table(title=f"Replicas of tier {t['name']}")
        for col in ("replica", "phase", "address", "pid"):
            replicas.add_column(col, no_wrap=True)
        for col in ("restarts", "age", "run", "wait", "kv", "tok/s", "in-flight"):
            replicas.add_column(col, justify="right")
        for r in t["replicas"]:
            replicas.add_row(r["id"], _phase(r), (r["url"] or "-").removeprefix("http://"),
                             _num(r["pid"]), str(r["restarts"]), _age(r["age_s"]),
                             _num(r["running"]), _num(r["waiting"]),
                             _num(r["kv_usage"], "{:.0%}"), _num(r["tokens_per_s"]),
                             _num(r["in_flight"]))
        tables.append(replicas)
    console.print(tiers)
    for table in tables:
        console.print(table)
    decisions = Table(title=f"Last scaling decisions (of {len(payload['decisions'])} kept)")
    for col in ("time", "tier", "policy", "replicas", "reason", "metrics"):
        decisions.add_column(col, overflow="fold")
    for d in payload["decisions"][-_DECISIONS_SHOWN:]:
        metrics = d.get("metrics", {})
        shown = ", ".join(f"{k}={metrics[k]:.3g}" for k in _KEY_METRICS if k in metrics)
        decisions.add_row(time.strftime("%H:%M:%S", time.localtime(d["time"])), d["tier"],
                          f"{d['policy']} ({d['source']})", f"{d['current']} -> {d['desired']}",
                          d["reason"], shown)
    console.print(decisions)
