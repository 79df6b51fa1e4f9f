"""Routing policies on real engines: the simulator's three workloads, scaled to a CPU.

    python benchmarks/routing_real.py                  # 2 engines, 3 workloads, 4 policies, x3
    python benchmarks/routing_real.py --workloads chat --repeats 1 --duration 20   # a look

Starts ``--engines`` real ``strata engine`` processes (bundled SmolLM2-135M, ``--threads 1``
each, pinned one per core with ``taskset`` when the machine has that many cores), and for
every (repeat, workload, policy) a real gateway (``strata.gateway.cli``) on loopback in
front of them, and replays the workload open-loop through it with streamed completions.
The workloads are ``strata.sim.workloads``' (``chat``: a few long system prompts shared by
many users and multi-turn sessions with growing history; ``unique``: the same arrivals and
lengths, nothing shared; ``hot``: one prefix in 80 % of the requests), scaled so that prefill
dominates on a small CPU: system prompts ``--system-tokens`` (default 384-768), user turns
16-64 tokens, answers ``--output-tokens`` (default 4-8, ``ignore_eos``), 16-token blocks.
Prompts are token ids built from the block ids (``strata.bench.prompts``), so requests
that share a block share its tokens; each (repeat, workload, policy) gets its own block
contents, so no run inherits a cache another run warmed. Policies run interleaved within
each repeat, so slow drift of a shared machine hits them alike.

Policies: ``round_robin``, ``least_requests``, ``prefix_affinity`` and ``default``
(``resource_match`` with its default parameters). Reports TTFT p50/p90, E2E mean,
completed requests/s and the prefix-cached share of prompt tokens (from each response's
``usage.prompt_tokens_details.cached_tokens``): median over repeats and the min-max spread.
Writes ``results/routing_real.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from routing_mooncake import free_port, replay, start, wait_idle  # noqa: E402

from strata.bench.prompts import PromptSynthesizer, load_bench_tokenizer  # noqa: E402
from strata.bench.traces import Trace  # noqa: E402
from strata.sim.workloads import WorkloadOptions, build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ["round_robin", "least_requests", "prefix_affinity", "default"]
WORKLOADS = ["chat", "unique", "hot"]
_SALT = 1_000_000_000


def pair(text: str) -> tuple[int, int]:
    """'a-b' -> (a, b)."""
    a, _, b = text.partition("-")
    return int(a), int(b or a)


def workload(name: str, args: argparse.Namespace, seed: int) -> Trace:
    """The named workload at the CPU scale (module docstring)."""
    system = pair(args.system_tokens)
    opts = WorkloadOptions(
        rate=args.rate, duration_s=args.duration, block_tokens=16, tenants=args.tenants,
        system_tokens=system, turns_mean=4.0, user_tokens=(16, 64),
        output_tokens=pair(args.output_tokens), think_s=args.think_s,
        max_prompt_tokens=args.max_prompt_tokens, hot_share=0.8, hot_tokens=system[1],
        seed=seed)
    return build(name, opts)


def stats(outcomes: list[Any], wall: float) -> dict[str, float]:
    """TTFT p50/p90, E2E mean, completed req/s, cached share, errors."""
    ok = [o for o in outcomes if o.ok]

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    prompt = sum(o.prompt_tokens for o in ok)
    return {"ttft_p50_s": pct([o.ttft_s for o in ok], 0.5),
            "ttft_p90_s": pct([o.ttft_s for o in ok], 0.9),
            "e2e_mean_s": statistics.fmean(o.e2e_s for o in ok) if ok else float("nan"),
            "throughput_rps": len(ok) / wall if wall > 0 else 0.0,
            "cached_share": sum(o.cached_tokens for o in ok) / prompt if prompt else 0.0,
            "errors": len(outcomes) - len(ok), "requests": len(outcomes),
            "per_replica": sorted(Counter(o.replica for o in ok).values())}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: median [min-max] over repeats per (workload, policy)."""
    out = ["| workload | policy | TTFT p90 s | vs round_robin | TTFT p50 s | E2E mean s | "
           "req/s | cached share | errors |", "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for wl in WORKLOADS:
        sel = [r for r in rows if r["workload"] == wl]
        if not sel:
            continue
        base = [r["ttft_p90_s"] for r in sel if r["policy"] == "round_robin"]
        base_m = statistics.median(base) if base else None
        for pol in POLICIES:
            got = [r for r in sel if r["policy"] == pol]
            if not got:
                continue
            p90 = [r["ttft_p90_s"] for r in got]
            m = statistics.median(p90)
            out.append(
                f"| {wl} | {pol} | {m:.2f} [{min(p90):.2f}-{max(p90):.2f}] | "
                f"{f'{m / base_m:.2f}x' if base_m else ''} | "
                f"{statistics.median(r['ttft_p50_s'] for r in got):.2f} | "
                f"{statistics.median(r['e2e_mean_s'] for r in got):.2f} | "
                f"{statistics.median(r['throughput_rps'] for r in got):.2f} | "
                f"{statistics.median(r['cached_share'] for r in got):.1%} | "
                f"{sum(r['errors'] for r in got)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """Start the engines, replay every (repeat, workload, policy), print and write."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--engine-arg", action="append", default=[],
                   help="`strata engine` argument (repeat); default: --threads 1")
    p.add_argument("--no-pin", action="store_true", help="do not taskset engines to cores")
    p.add_argument("--kv-tokens", type=int, default=16384, help="KV cache per engine, tokens")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rate", type=float, default=1.0, help="offered requests/s (nominal)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--system-tokens", default="384-768")
    p.add_argument("--output-tokens", default="4-8")
    p.add_argument("--think-s", type=float, default=10.0)
    p.add_argument("--max-prompt-tokens", type=int, default=1536)
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "routing_real.json")
    args = p.parse_args(argv)
    logs = args.out.parent / "routing-real-logs"
    logs.mkdir(parents=True, exist_ok=True)
    synth = PromptSynthesizer(load_bench_tokenizer(None), verify=False)
    policies = args.policies.split(",")
    rows: list[dict[str, Any]] = []
    cores = os.cpu_count() or 1
    with ExitStack() as stack:
        engines = []
        for i in range(args.engines):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            pin = [] if args.no_pin or cores < args.engines else ["taskset", "-c", str(i)]
            start(stack, [*pin, sys.executable, "-m", "strata.cli", "engine",
                          "--host", "127.0.0.1", "--port", str(port),
                          "--max-model-len", str(args.max_prompt_tokens + 64),
                          "--block-size", "16", "--num-kv-blocks", str(args.kv_tokens // 16),
                          *(args.engine_arg or ["--threads", "1"])],
                  url, logs / f"engine{i}.log", 900)
            engines.append(url)
        model = httpx.get(engines[0] + "/v1/models", timeout=10).json()["data"][0]["id"]
        run = 0
        for rep in range(args.repeats):
            for wl in args.workloads.split(","):
                trace = workload(wl, args, seed=rep)
                recs = trace.records
                if not recs:
                    print(f"repeat {rep} {wl}: no requests, skipped", flush=True)
                    continue
                print(f"repeat {rep} {wl}: {len(recs)} requests over {args.duration:g} s, "
                      f"prompt mean {statistics.fmean(r.input_tokens for r in recs):.0f} "
                      f"tokens", flush=True)
                for pol in policies:
                    run += 1
                    wait_idle(engines)
                    with ExitStack() as gw_stack:
                        port = free_port()
                        gw = f"http://127.0.0.1:{port}"
                        start(gw_stack, [sys.executable, "-m", "strata.gateway.cli",
                                         "--port", str(port), "--policy",
                                         "resource_match" if pol == "default" else pol,
                                         "--poll-interval-s", "0.2", "--prefix-chunk-tokens",
                                         "16", "--read-timeout-s", str(args.timeout_s),
                                         *sum((["--replica", e] for e in engines), [])],
                              gw, logs / f"gateway-{run}.log", 60)
                        time.sleep(1.0)  # first health checks and load reports
                        salted = replace(trace, records=tuple(
                            replace(r, hash_ids=tuple(h + run * _SALT for h in r.hash_ids))
                            for r in recs))
                        outcomes, wall = asyncio.run(replay(gw, salted, synth, model, 0,
                                                            args.timeout_s))
                    row = {"repeat": rep, "workload": wl, "policy": pol,
                           **stats(outcomes, wall), "wall_s": wall}
                    rows.append(row)
                    print(f"  {pol:16s} TTFT p90 {row['ttft_p90_s']:.2f} s  p50 "
                          f"{row['ttft_p50_s']:.2f} s  req/s {row['throughput_rps']:.2f}  "
                          f"cached {row['cached_share']:.1%}  errors {row['errors']}",
                          flush=True)
    md = table(rows)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/routing_real.py", *(argv or sys.argv[1:])]),
        "args": {k: str(v) for k, v in vars(args).items()}, "engines": len(engines),
        "rows": rows, "table": md}, indent=1))
    args.out.with_suffix(".md").write_text(md + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
