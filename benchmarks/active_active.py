"""Two gateways over the same two engines: do they agree on where a prefix lives?

Two real engines (the bundled model) and two pairs of gateways in front of both, in one
run. One pair reads what the engines' prefix caches hold (``/internal/prefix``, with the
cluster's internal token); the other, the peer, is refused those reports (no token), so
each of its gateways knows only the prompts it sent itself: strata's routing before
engine-reported prefixes, and what any router without shared state does.

The workload: ``--groups`` prompt groups, each sharing a ~``--prefix-bytes`` prefix with a
short distinct question, ``--per-group`` requests per group, sent in rounds through the two
gateways of a pair alternately by ``--clients`` concurrent clients. Per pair: agreement
(requests served by their group's most used replica), groups whose most used replica is
the same through both gateways, the prompt tokens the engines served
from their prefix cache (usage.prompt_tokens_details.cached_tokens), and latency. Each pair
gets its own groups, so one pair's prompts never warm the other's; the two pairs run at
the same time, so both see the same engines under the same load. "busiest" is the share
of requests the busier replica served: agreement means little if one replica took all.

    python benchmarks/active_active.py            # prints a table, writes results/active_active.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.integration.conftest import free_port, stop, wait_healthy  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
TOKEN = "bench-internal-token"  # noqa: S105 - a benchmark value, not a secret


def start(cmd: list[str], token: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "STRATA_INTERNAL_TOKEN"}
    if token:
        env["STRATA_INTERNAL_TOKEN"] = token
    proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def prompt(pair: int, group: int, i: int, prefix_bytes: int) -> str:
    head = f"Pair {pair}, case file {group}. "
    line = f"The archive of district {group} lists every permit granted there. "
    return head + line * max(1, (prefix_bytes - len(head)) // len(line)) + f" Question {i}?"


def run_pair(pair: int, gateways: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Send the workload through one pair; agreement, cache hits and latency."""
    jobs = [(g, i) for i in range(args.per_group) for g in range(args.groups)]
    served: dict[int, Counter[str]] = {g: Counter() for g in range(args.groups)}
    by_gateway: dict[tuple[int, int], Counter[str]] = {}
    latencies: list[float] = []
    prompt_tokens = cached_tokens = 0

    def send(n: int) -> tuple[int, str, float, int, int]:
        g, i = jobs[n]
        body = {"model": MODEL, "prompt": prompt(pair, g, i, args.prefix_bytes),
                "max_tokens": args.max_tokens, "temperature": 0}
        t0 = time.perf_counter()
        # each group alternates between the pair's gateways, request by request
        resp = httpx.post(gateways[(g + i) % 2] + "/v1/completions", json=body, timeout=300)
        resp.raise_for_status()
        usage = resp.json()["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return (g, i, resp.headers["x-strata-replica"], time.perf_counter() - t0,
                usage["prompt_tokens"], cached)

    with ThreadPoolExecutor(args.clients) as pool:
        for g, i, replica, dt, p, c in pool.map(send, range(len(jobs))):
            served[g][replica] += 1
            by_gateway.setdefault((g, (g + i) % 2), Counter())[replica] += 1
            latencies.append(dt)
            prompt_tokens += p
            cached_tokens += c
    agree = sum(c.most_common(1)[0][1] for c in served.values())
    same_choice = sum(by_gateway[g, 0].most_common(1)[0][0] == by_gateway[g, 1].most_common(1)[0][0]
                      for g in range(args.groups))
    per_replica = sum(served.values(), Counter())
    return {"agreement": agree / len(jobs), "groups_same_choice": same_choice / args.groups,
            "cached_ratio": cached_tokens / prompt_tokens,
            "busiest_replica_share": max(per_replica.values()) / len(jobs),
            "latency_p50_s": statistics.median(latencies),
            "latency_mean_s": statistics.fmean(latencies), "requests": len(jobs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--prefix-bytes", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "active_active.json")
    args = ap.parse_args()

    from strata.engine.weights import bundled_model_path

    model = str(bundled_model_path())
    procs: list[subprocess.Popen] = []
    try:
        engines = []
        for _ in range(2):
            proc, url = start([sys.executable, "-m", "strata.cli", "engine", "--model", model,
                               "--threads", "1", "--dtype", "float32", "--num-kv-blocks",
                               "1024", "--max-model-len", "2048"], TOKEN)
            procs.append(proc)
            engines.append(url)
        for proc, url in zip(procs, engines, strict=True):
            wait_healthy(url, proc)
        replicas = sum((["--replica", u] for u in engines), [])
        pairs: dict[str, list[str]] = {}
        for name, token in (("engine reports", TOKEN), ("own requests only (peer)", None)):
            pairs[name] = []
            for _ in range(2):
                proc, url = start([sys.executable, "-m", "strata.gateway.cli", *replicas,
                                   "--log-level", "error"], token)
                procs.append(proc)
                wait_healthy(url, proc, 60)
                pairs[name].append(url)
        time.sleep(1.0)
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in pairs}
        for rep in range(args.repeats):  # fresh groups each round, on the same engines
            # Both pairs at once: the same engines, the same moment, the same noise.
            with ThreadPoolExecutor(len(pairs)) as pool:
                futures = {name: pool.submit(run_pair, rep * len(pairs) + i, gws, args)
                           for i, (name, gws) in enumerate(pairs.items())}
                for name, f in futures.items():
                    rounds[name].append(f.result())
    finally:
        for proc in procs:
            stop(proc)

    results = {name: {k: statistics.fmean(r[k] for r in rs) for k in rs[0]}
               for name, rs in rounds.items()}
    for name, rs in rounds.items():
        results[name]["agreement_min"] = min(r["agreement"] for r in rs)
    print(f"means over {args.repeats} rounds; agreement min is the worst round")
    print(f"{'gateways route by':28} {'agreement':>9} {'min':>6} {'groups':>6} {'busiest':>7} "
          f"{'cached':>7} {'p50 s':>6} {'mean s':>7}")
    for name, r in results.items():
        print(f"{name:28} {r['agreement']:9.1%} {r['agreement_min']:6.1%} "
              f"{r['groups_same_choice']:6.0%} "
              f"{r['busiest_replica_share']:7.1%} "
              f"{r['cached_ratio']:7.1%} "
              f"{r['latency_p50_s']:6.2f} {r['latency_mean_s']:7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count()},
        "results": results, "rounds": rounds}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
