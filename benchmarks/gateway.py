"""Gateway overhead: strata's gateway vs sglang-router and vllm-router, same run, same backends.

N fake OpenAI streaming backends (``strata.bench.fake_backend``, separate processes, no
model: 0 ms to first token, 0 ms between tokens, exactly ``--tokens`` tokens per response)
sit behind each router in turn. Two measurements per target:

1. **Added TTFT**: requests one at a time, targets interleaved round by round so drift and
   noise hit all alike; time to the first body byte, p50/p99, minus the same for the
   backends called directly (the client round-robins over them itself).
2. **Sustained requests/s**: closed loop at each ``--concurrency`` level for
   ``--duration-s`` seconds (after a warm-up second), ``--repeats`` rounds with targets
   interleaved; per level the median round, and the best level with no failed request
   counts.

Peers are installed from PyPI into their own venv (``peers/router-venv``, git-ignored) on
first use. The client is strata's own pooled HTTP/1.1 client (strata.gateway.upstream), the
cheapest available, so that it perturbs the measurement least; on a small machine every
process here shares the same cores, so compare targets with each other within one run.

    python benchmarks/gateway.py                    # prints a table, writes results/gateway.json
    python benchmarks/gateway.py --backends 4 --concurrency 8 32 128 --duration-s 4 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from strata.gateway.upstream import UpstreamPool

ROOT = Path(__file__).resolve().parents[1]
PEERS_VENV = ROOT / "peers" / "router-venv"
PEER_PACKAGES = ["sglang-router==0.3.2", "vllm-router==0.1.17"]


@dataclass
class TargetResult:
    """Everything measured for one target."""

    name: str
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    added_p50_ms: float = 0.0
    added_p99_ms: float = 0.0
    best_rps: float = 0.0
    best_concurrency: int = 0
    levels: list[dict[str, float]] = field(default_factory=list)
    note: str = ""


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Block until GET url answers 200, failing fast if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def start(stack: ExitStack, cmd: list[str], health_url: str, log: Path) -> None:
    """Start a process that the stack terminates, and wait for its health URL."""
    out = log.open("wb")
    stack.callback(out.close)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    stack.callback(stop)
    wait_healthy(health_url, proc)


def ensure_peers(venv: Path) -> dict[str, Path | str]:
    """Paths of the peer routers' launchers, installing them on first use; else the reason."""
    bins = {"sglang-router": venv / "bin" / "sglang-router",
            "vllm-router": venv / "bin" / "vllm-router"}
    if not all(p.exists() for p in bins.values()):
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *PEER_PACKAGES],
                           check=True)
        except subprocess.CalledProcessError as err:
            return {name: f"install failed: {err}" for name in bins}
    return {name: (p if p.exists() else "not installed") for name, p in bins.items()}


def request_body(tokens: int) -> bytes:
    """A streamed completion that yields exactly ``tokens`` tokens."""
    return json.dumps({"model": "strata-fake", "prompt": "hello world", "max_tokens": tokens,
                       "ignore_eos": True, "stream": True}).encode()


async def one_request(pool: UpstreamPool, body: bytes, tokens: int) -> float:
    """Send one streamed request; its TTFT in seconds. Raises on a wrong or short answer."""
    t0 = time.perf_counter()
    resp = await pool.post("/v1/completions", body)
    ttft = 0.0
    events = 0
    tail = b""
    try:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read_all(300))!r}")
        while chunk := await resp.read():
            if not ttft:
                ttft = time.perf_counter() - t0
            buf = tail + chunk  # an event marker may straddle two reads
            events += buf.count(b"data: ")
            tail = buf[-5:]
    finally:
        resp.release()
    if events != tokens + 1:  # one event per token, then [DONE]
        raise RuntimeError(f"expected {tokens + 1} SSE events, got {events}")
    return ttft


async def measure_ttft(pools: dict[str, list[UpstreamPool]], body: bytes, tokens: int,
                       rounds: int, warmup: int) -> dict[str, list[float]]:
    """Sequential TTFTs per target, targets in a fresh random order each round."""
    samples: dict[str, list[float]] = {name: [] for name in pools}
    names = list(pools)
    for i in range(rounds + warmup):
        random.shuffle(names)
        for name in names:
            group = pools[name]
            ttft = await one_request(group[i % len(group)], body, tokens)
            if i >= warmup:
                samples[name].append(ttft)
    return samples


async def measure_rps(group: list[UpstreamPool], body: bytes, tokens: int, concurrency: int,
                      duration_s: float) -> dict[str, float]:
    """Closed loop: ``concurrency`` workers back to back; completions/s after a 1 s warm-up."""
    done = 0
    errors = 0
    ttfts: list[float] = []
    t_start = time.perf_counter()
    t_measure = t_start + 1.0
    t_end = t_measure + duration_s
    counter = 0

    async def worker() -> None:
        nonlocal done, errors, counter
        while time.perf_counter() < t_end:
            counter += 1
            try:
                ttft = await one_request(group[counter % len(group)], body, tokens)
            except Exception:
                errors += 1
                continue
            if time.perf_counter() >= t_measure:
                done += 1
                ttfts.append(ttft)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t_measure
    ttfts.sort()
    return {"concurrency": concurrency, "rps": done / elapsed, "errors": errors,
            "ttft_p50_ms": 1e3 * ttfts[len(ttfts) // 2] if ttfts else 0.0}


def percentile_ms(values: list[float], q: float) -> float:
    """The q-quantile of seconds, in ms."""
    values = sorted(values)
    return 1e3 * values[min(len(values) - 1, int(q * len(values)))]


def launch_targets(stack: ExitStack, args: argparse.Namespace, logs: Path
                   ) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """Start backends and routers; (backend URLs, target -> base URLs, target -> note)."""
    backends = []
    for i in range(args.backends):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        start(stack, [sys.executable, "-m", "strata.bench.fake_backend", "--port", str(port),
                      "--ttft-ms", "0", "--itl-ms", "0", "--output-tokens", str(args.tokens)],
              url + "/health", logs / f"backend{i}.log")
        backends.append(url)
    targets: dict[str, list[str]] = {"direct": backends}
    notes: dict[str, str] = {"direct": f"client round-robins over {args.backends} backends"}
    for policy in ("resource_match", "round_robin"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "strata.gateway.cli", "--port", str(port),
               "--policy", policy, *sum((["--replica", b] for b in backends), [])]
        start(stack, cmd, url + "/health", logs / f"strata-{policy}.log")
        targets[f"strata ({policy})"] = [url]
    peers = ensure_peers(Path(args.peers_venv))
    for name, launcher in peers.items():
        key = f"{name} (round_robin)"
        if isinstance(launcher, str):
            notes[key] = launcher
            continue
        port, prom = free_port(), free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(launcher), *(["launch"] if name == "sglang-router" else []),
               "--worker-urls", *backends, "--policy", "round_robin", "--host", "127.0.0.1",
               "--port", str(port), "--prometheus-port", str(prom)]
        try:
            start(stack, cmd, url + "/health", logs / f"{name}.log")
        except (RuntimeError, TimeoutError) as err:
            notes[key] = f"did not start: {err}"
            continue
        targets[key] = [url]
    return backends, targets, notes


async def run(args: argparse.Namespace, targets: dict[str, list[str]]
              ) -> dict[str, TargetResult]:
    """Both measurements for every target."""
    body = request_body(args.tokens)
    pools = {name: [UpstreamPool(u, 5.0, 60.0) for u in urls] for name, urls in targets.items()}
    samples = await measure_ttft(pools, body, args.tokens, args.rounds, args.warmup)
    base50 = percentile_ms(samples["direct"], 0.5)
    base99 = percentile_ms(samples["direct"], 0.99)
    results: dict[str, TargetResult] = {}
    for name, values in samples.items():
        p50, p99 = percentile_ms(values, 0.5), percentile_ms(values, 0.99)
        results[name] = TargetResult(name, p50, p99, p50 - base50, p99 - base99)
    # Throughput in rounds: every target at every level once per round, targets in a fresh
    # random order, so a noisy neighbour or a slow minute hits all targets alike.
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for rnd in range(args.repeats):
        for c in args.concurrency:
            names = list(pools)
            random.shuffle(names)
            for name in names:
                level = await measure_rps(pools[name], body, args.tokens, c, args.duration_s)
                runs.setdefault((name, c), []).append(level)
                print(f"  round {rnd + 1} {name:32s} c={c:4d} {level['rps']:8.1f} req/s "
                      f"errors={int(level['errors'])}", flush=True)
    for name in pools:
        for c in args.concurrency:
            levels = runs[(name, c)]
            results[name].levels.append({
                "concurrency": c, "rps": statistics.median(lv["rps"] for lv in levels),
                "errors": sum(lv["errors"] for lv in levels),
                "ttft_p50_ms": statistics.median(lv["ttft_p50_ms"] for lv in levels),
                "rps_rounds": [lv["rps"] for lv in levels]})
        ok = [lv for lv in results[name].levels if lv["errors"] == 0] or results[name].levels
        best = max(ok, key=lambda lv: lv["rps"])
        results[name].best_rps = best["rps"]
        results[name].best_concurrency = int(best["concurrency"])
    for group in pools.values():
        for pool in group:
            await pool.close()
    return results


def table(results: dict[str, TargetResult], notes: dict[str, str]) -> str:
    """The markdown table for docs/results.md."""
    lines = ["| target | TTFT p50 (ms) | TTFT p99 (ms) | added p50 (ms) | added p99 (ms) "
             "| max req/s (at c) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        added = "—" if name == "direct" else f"{r.added_p50_ms:+.2f}"
        added99 = "—" if name == "direct" else f"{r.added_p99_ms:+.2f}"
        lines.append(f"| {name} | {r.ttft_p50_ms:.2f} | {r.ttft_p99_ms:.2f} | {added} | "
                     f"{added99} | {r.best_rps:.0f} (c={r.best_concurrency}) |")
    for name, note in notes.items():
        if name not in results:
            lines.append(f"| {name} | — | — | — | — | not measured: {note} |")
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and print/write its results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32, help="tokens per response")
    p.add_argument("--rounds", type=int, default=400, help="sequential TTFT samples per target")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--duration-s", type=float, default=4.0, help="per level and round")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the median counts")
    p.add_argument("--peers-venv", default=str(PEERS_VENV))
    p.add_argument("--out", default=str(ROOT / "results" / "gateway.json"))
    args = p.parse_args()
    out = Path(args.out)
    logs = out.parent / "gateway-logs"
    logs.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        backends, targets, notes = launch_targets(stack, args, logs)
        print(f"targets: {', '.join(targets)}", flush=True)
        results = asyncio.run(run(args, targets))
    md = table(results, notes)
    print(md)
    rust = [r.best_rps for n, r in results.items() if "router" in n]
    strata = results["strata (resource_match)"]
    verdict = {
        "added_p50_ms": strata.added_p50_ms,
        "target_added_p50_ms": 1.0,
        "rps_vs_faster_rust_router": strata.best_rps / max(rust) if rust else None,
        "target_rps_ratio": 0.5,
    }
    print(json.dumps(verdict))
    out.write_text(json.dumps({
        "benchmark": "gateway", "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                    "python": platform.python_version()},
        "args": vars(args), "results": {n: asdict(r) for n, r in results.items()},
        "notes": notes, "verdict": verdict, "table": md}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
