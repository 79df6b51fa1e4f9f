"""A simulation's result: the same latency and SLO numbers as ``strata bench``, plus GPU cost.

Latencies are measured from a request's arrival (the client's send) as ``strata bench``
measures them: TTFT to the first token, E2E to the last, TPOT = (E2E - TTFT) / (output - 1),
and a request meets the SLOs when it completed with TTFT and TPOT within the objectives
(``strata.bench.metrics.meets_slo``). GPU cost: *provisioned* GPU-seconds count every unit
from its creation (start-up included) to its stop; *busy* GPU-seconds count iterations in
progress; utilisation is busy over provisioned.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from strata.bench.metrics import latency_stats
from strata.sim.cluster import SimCluster, SimStats


def summarize(cluster: SimCluster, stats: SimStats) -> dict[str, Any]:
    """Headline numbers of one simulation (JSON-ready)."""
    reqs = cluster.requests
    s = cluster.setup
    ok = [r for r in reqs if r.status == "ok"]
    ttft = [r.first_token_s - r.arrival_s for r in ok]
    e2e = [r.finish_s - r.arrival_s for r in ok]
    tpot = [(r.finish_s - r.first_token_s) / (r.output_tokens - 1) for r in ok
            if r.output_tokens > 1]
    good = sum(1 for r in ok if r.first_token_s - r.arrival_s <= s.slo_ttft_s and (
        r.output_tokens <= 1
        or (r.finish_s - r.first_token_s) / (r.output_tokens - 1) <= s.slo_tpot_s))
    start = min((r.arrival_s for r in reqs), default=0.0)
    end = max((r.finish_s for r in ok), default=start)
    duration = max(end - start, 1e-9)
    out_tokens = sum(r.output_tokens for r in ok)
    gpu_h = stats.provisioned_gpu_s / 3600.0
    status = Counter(r.status for r in reqs)
    return {
        "requests": len(reqs),
        "completed": len(ok),
        "status": dict(status),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "input_token_throughput": sum(r.prompt_tokens for r in ok) / duration,
        "goodput": good / duration,
        "slo_attainment": good / len(reqs) if reqs else 0.0,
        "slo_ttft_ms": s.slo_ttft_s * 1000.0,
        "slo_tpot_ms": s.slo_tpot_s * 1000.0,
        "ttft": latency_stats(ttft).model_dump(),
        "tpot": latency_stats(tpot).model_dump(),
        "e2e": latency_stats(e2e).model_dump(),
        "preempted_requests": sum(1 for r in reqs if r.preemptions),
        "prefix_cached_tokens": sum(r.cached_tokens for r in ok),
        "gpu": {
            "gpus_per_unit": cluster.setup.replica.gpus,
            "provisioned_gpu_hours": gpu_h,
            "busy_gpu_hours": stats.busy_gpu_s / 3600.0,
            "utilization": stats.busy_gpu_s / stats.provisioned_gpu_s
            if stats.provisioned_gpu_s > 0 else 0.0,
            "mean_gpus": stats.provisioned_gpu_s / max(stats.end_s, 1e-9),
            "output_tokens_per_gpu_s": out_tokens / stats.provisioned_gpu_s
            if stats.provisioned_gpu_s > 0 else 0.0,
        },
        "scaling": {
            "units_started": stats.units_started,
            "units_stopped": stats.units_stopped,
            "decisions": len(cluster.decisions),
            "scale_changes": sum(1 for d in cluster.decisions if d.scales),
            "startup_s_mean": sum(stats.startups) / len(stats.startups)
            if stats.startups else None,
        },
        "simulator": {
            "wall_s": stats.wall_s,
            "events": stats.events,
            "events_per_s": stats.events / stats.wall_s if stats.wall_s > 0 else 0.0,
            "iterations": stats.steps,
            "scheduler_steps": stats.real_steps,
            "iterations_per_s": stats.steps / stats.wall_s if stats.wall_s > 0 else 0.0,
            "virtual_s": stats.end_s,
        },
    }


def result_document(cluster: SimCluster, stats: SimStats, config: dict[str, Any],
                    *, with_requests: bool = False) -> dict[str, Any]:
    """The result file: what was simulated, the summary, time series and scale decisions."""
    doc: dict[str, Any] = {
        "config": config,
        "summary": summarize(cluster, stats),
        "series": cluster.series,
        "decisions": [d.to_dict() for d in cluster.decisions if d.scales],
    }
    if with_requests:
        doc["requests"] = [
            {"id": r.req_id, "arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens,
             "output_tokens": r.output_tokens, "status": r.status, "replica": r.replica,
             "ttft_s": r.first_token_s - r.arrival_s if r.first_token_s >= 0 else None,
             "e2e_s": r.finish_s - r.arrival_s if r.finish_s >= 0 else None}
            for r in cluster.requests]
    return doc


def save(doc: dict[str, Any], path: Path) -> None:
    """Write a result file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs for a terminal table."""
    t, e, g, sim = summary["ttft"], summary["e2e"], summary["gpu"], summary["simulator"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    return [
        ("requests (completed)", f"{summary['requests']:,} ({summary['completed']:,})"),
        ("status", ", ".join(f"{k} {v}" for k, v in sorted(summary["status"].items()))),
        ("throughput req/s | out tok/s", f"{summary['request_throughput']:.2f} | "
                                         f"{summary['output_token_throughput']:,.0f}"),
        ("TTFT p50 / p90 / p99 ms", f"{ms(t['p50_ms'])} / {ms(t['p90_ms'])} / {ms(t['p99_ms'])}"),
        ("E2E  p50 / p90 / p99 ms", f"{ms(e['p50_ms'])} / {ms(e['p90_ms'])} / {ms(e['p99_ms'])}"),
        ("E2E mean ms", ms(e["mean_ms"])),
        ("SLO attainment", f"{summary['slo_attainment']:.1%} (TTFT <= {summary['slo_ttft_ms']:.0f}"
                           f" ms, TPOT <= {summary['slo_tpot_ms']:.0f} ms)"),
        ("GPU-hours provisioned | busy", f"{g['provisioned_gpu_hours']:.2f} | "
                                         f"{g['busy_gpu_hours']:.2f}"),
        ("utilisation", f"{g['utilization']:.1%}"),
        ("units started", str(summary["scaling"]["units_started"])),
        ("simulated | wall s", f"{sim['virtual_s']:,.0f} | {sim['wall_s']:.1f}"),
        ("events/s | iterations/s", f"{sim['events_per_s']:,.0f} | {sim['iterations_per_s']:,.0f}"),
    ]
