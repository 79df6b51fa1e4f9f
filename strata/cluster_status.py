"""What ``GET /admin/status`` says about a running cluster, and how ``strata status`` shows it.

The payload is plain JSON (tiers, replicas with their load, recent scaling decisions) so
other tools can read it too; ``render_status`` turns it into three rich tables.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from strata.cluster import Cluster

_DECISIONS_SHOWN = 10
_KEY_METRICS = ("kv_usage", "waiting", "arrival_rate_rps", "forecast_rps", "ttft_p90_s",
                "demand_tokens_per_s", "capacity_tokens_per_s", "concurrency")


def status_payload(cluster: Cluster) -> dict[str, Any]:
    """The cluster's state now, JSON-ready."""
    now = time.monotonic()
    cfg = cluster.config
    gw = cluster.gateway.replicas.replicas
    tiers = []
    for name, tier in cfg.tiers.items():
        policy = cluster.autoscaler.policies.get(name)
        replicas = []
        for r in cluster.platform.replicas(name):
            g = gw.get(r.url) if r.url is not None else None
            load = g.load if g is not None else None
            replicas.append({
                "id": r.replica_id, "phase": r.phase, "url": r.url, "pid": r.pid,
                "restarts": r.restarts, "crash_streak": r.crash_streak,
                "age_s": now - r.started_at, "startup_s": r.startup_s,
                "ready_for_s": None if r.ready_at is None else now - r.ready_at,
                "last_exit": r.last_exit,
                "in_flight": g.in_flight if g is not None else None,
                "running": load.running if load else None,
                "waiting": load.waiting if load else None,
                "kv_usage": load.kv_usage if load else None,
                "tokens_per_s": (load.prompt_tokens_per_s + load.generation_tokens_per_s)
                if load else None,
            })
        tiers.append({
            "name": name, "kind": tier.kind, "policy": policy.name if policy else "fixed",
            "min": tier.min_replicas, "max": tier.max_replicas,
            "desired": cluster.platform.desired(name),
            "ready": len(cluster.platform.endpoints(name)),
            "last_error": cluster.autoscaler.last_error(name), "replicas": replicas})
    return {
        "url": cluster.url, "uptime_s": time.time() - cluster.started_at,
        "routing": cfg.routing.policy, "source": cluster.autoscaler.source,
        "period_s": cfg.autoscaler.period_s, "slos": cfg.slos.model_dump(),
        "tiers": tiers,
        "decisions": [d.to_dict() for d in cluster.autoscaler.recent()],
    }


def _num(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _age(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render_status(payload: dict[str, Any], console: Console) -> None:
    """Tiers, replicas and the last scaling decisions as tables."""
    console.print(f"cluster at {payload['url']}, up {_age(payload['uptime_s'])}; routing "
                  f"{payload['routing']}; autoscaler every {payload['period_s']:g} s from "
                  f"{payload['source']}")
    tiers = Table(title="Tiers")
    for col in ("tier", "kind", "policy", "ready/desired", "min..max", "note"):
        tiers.add_column(col)
    tables = []
    for t in payload["tiers"]:
        tiers.add_row(t["name"], t["kind"], t["policy"], f"{t['ready']}/{t['desired']}",
                      f"{t['min']}..{t['max']}", t["last_error"] or "")
        replicas = Table(title=f"Replicas of tier {t['name']}")
        for col in ("replica", "phase", "address", "pid"):
            replicas.add_column(col, no_wrap=True)
        for col in ("restarts", "age", "run", "wait", "kv", "tok/s", "in-flight"):
            replicas.add_column(col, justify="right")
        for r in t["replicas"]:
            phase = r["phase"] if not r["last_exit"] or r["phase"] == "ready" else \
                f"{r['phase']} ({r['last_exit']})"
            replicas.add_row(r["id"], phase, (r["url"] or "-").removeprefix("http://"),
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
