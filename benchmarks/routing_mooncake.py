"""Routing policies on the Mooncake conversation trace, against real strata engines.

Replays a window of ``../shared/data/mooncake_conversation.jsonl`` through strata's gateway
in front of ``--engines`` real engine processes (the bundled SmolLM2-135M), once per
policy — resource_match, prefix_affinity, least_requests, round_robin by default — and
reports TTFT p50/p99, E2E p50/p99 and the prefix-cache hit rate (cached prompt tokens /
prompt tokens, from each response's ``usage.prompt_tokens_details.cached_tokens``).

How the trace is fitted to a 135M model on a CPU, all printed with the result:
- prompt lengths and the 512-token block are scaled by ``--length-factor`` (default 1/64,
  so a block is 8 tokens) and clipped to ``--max-context``; outputs are capped at
  ``--max-output`` tokens (``ignore_eos``, so exactly that many);
- prompts are token ids built from the hash ids (strata.bench.prompts): requests that
  shared a prefix block in production share it here token for token;
- the first ``--requests`` arrivals (from ``--start-s``) are re-timed to a mean of
  ``--rate`` requests/s, keeping their relative spacing (bursts stay bursts);
- each policy gets its own block contents (hash ids offset per policy), so no run profits
  from a cache another run warmed; the engines stay up between runs;
- the engines' KV block is the scaled trace block (at most 16 tokens), so a shared prefix
  block can be served from their prefix cache at all.

    python benchmarks/routing_mooncake.py                       # starts 2 engines itself
    python benchmarks/routing_mooncake.py --replica http://127.0.0.1:8001 --replica ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from strata.bench.prompts import PromptSynthesizer, load_bench_tokenizer
from strata.bench.traces import (
    Trace,
    default_data_dir,
    fit_lengths,
    head,
    load_trace,
    scale_time,
    window,
)
from strata.gateway.upstream import UpstreamPool

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ["resource_match", "prefix_affinity", "least_requests", "round_robin"]
_POLICY_SALT = 1_000_000_000


@dataclass
class Outcome:
    """One request's result."""

    ok: bool
    replica: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


@dataclass
class PolicyResult:
    """Aggregates of one policy's replay."""

    policy: str
    requests: int
    errors: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    prefix_hit_rate: float
    per_replica: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(stack: ExitStack, cmd: list[str], url: str, log: Path, timeout_s: float) -> None:
    """Start a process the stack stops; wait for its /health."""
    out = log.open("wb")
    stack.callback(out.close)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    stack.callback(stop)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s; see {log}")


def prepare_trace(args: argparse.Namespace) -> Trace:
    """The trace window, fitted to the model and re-timed to the requested mean rate."""
    trace = load_trace("mooncake", Path(args.data_dir) if args.data_dir else None)
    if args.start_s:
        trace = window(trace, args.start_s, None)
    trace = head(trace, args.requests)
    trace = fit_lengths(trace, args.length_factor, args.max_context - args.max_output)
    trace = replace(trace, records=tuple(replace(r, output_tokens=min(r.output_tokens,
                                                                      args.max_output))
                                         for r in trace.records))
    span = trace.duration_s
    if span > 0:
        trace = scale_time(trace, (len(trace.records) / args.rate) / span)
    else:  # all at one instant in the trace: spread them evenly at the rate instead
        trace = replace(trace, records=tuple(replace(r, arrival_s=i / args.rate)
                                             for i, r in enumerate(trace.records)),
                        transforms=(*trace.transforms, f"constant {args.rate:g}/s"))
    return trace


def wait_idle(urls: list[str], timeout_s: float = 600) -> None:
    """Block until every engine reports nothing running or waiting."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        loads = [httpx.get(u + "/load", timeout=5).json() for u in urls]
        if all(x["running"] == 0 and x["waiting"] == 0 for x in loads):
            return
        time.sleep(0.5)
    raise TimeoutError("engines did not go idle")


async def send(pool: UpstreamPool, body: bytes, timeout_s: float) -> Outcome:
    """One streamed request; TTFT at the first token event, usage from the last event."""
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            resp = await pool.post("/v1/completions", body)
            try:
                if resp.status != 200:
                    text = (await resp.read_all(500)).decode(errors="replace")
                    return Outcome(False, error=f"HTTP {resp.status}: {text}")
                replica = next((v.decode() for k, v in resp.headers
                                if k == b"x-strata-replica"), "")
                ttft = 0.0
                usage: dict = {}
                pending = b""
                while chunk := await resp.read():
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if not line.startswith(b"data: {"):
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            return Outcome(False, replica, error=str(event["error"])[:300])
                        if event.get("usage"):
                            usage = event["usage"]
                        if not ttft and any(c.get("text") for c in event.get("choices", [])):
                            ttft = time.perf_counter() - t0
            finally:
                resp.release()
    except (TimeoutError, OSError, ValueError) as err:
        return Outcome(False, error=f"{type(err).__name__}: {err}")
    details = usage.get("prompt_tokens_details") or {}
    return Outcome(True, replica, ttft, time.perf_counter() - t0,
                   int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens", 0)))


async def replay(gateway: str, trace: Trace, synth: PromptSynthesizer, model: str,
                 salt: int, timeout_s: float) -> tuple[list[Outcome], float]:
    """Open loop: every request sent at its (re-timed) arrival time."""
    pool = UpstreamPool(gateway, 10.0, timeout_s)
    block = trace.block_tokens
    bodies = []
    for i, rec in enumerate(trace.records):
        ids = synth.token_ids(rec.input_tokens, i, tuple(h + salt for h in rec.hash_ids), block)
        bodies.append(json.dumps({
            "model": model, "prompt": list(ids), "max_tokens": rec.output_tokens,
            "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}).encode())
    t0 = time.perf_counter()

    async def at(delay: float, body: bytes) -> Outcome:
        await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
        return await send(pool, body, timeout_s)

    outcomes = await asyncio.gather(*(at(rec.arrival_s, body)
                                      for rec, body in zip(trace.records, bodies, strict=True)))
    wall = time.perf_counter() - t0
    await pool.close()
    return list(outcomes), wall


def summarize(policy: str, outcomes: list[Outcome], wall: float) -> PolicyResult:
    """Percentiles and hit rate of one replay."""
    ok = [o for o in outcomes if o.ok]

    def pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        values = sorted(values)
        return 1e3 * values[min(len(values) - 1, int(q * len(values)))]

    ttft = [o.ttft_s for o in ok]
    e2e = [o.e2e_s for o in ok]
    prompt = sum(o.prompt_tokens for o in ok)
    return PolicyResult(
        policy=policy, requests=len(outcomes), errors=len(outcomes) - len(ok),
        ttft_p50_ms=pct(ttft, 0.5), ttft_p99_ms=pct(ttft, 0.99), e2e_p50_ms=pct(e2e, 0.5),
        e2e_p99_ms=pct(e2e, 0.99),
        prefix_hit_rate=sum(o.cached_tokens for o in ok) / prompt if prompt else 0.0,
        per_replica=dict(Counter(o.replica for o in ok)), wall_s=wall)


def table(results: list[PolicyResult]) -> str:
    """The markdown table for docs/results.md."""
    lines = ["| policy | TTFT p50 (ms) | TTFT p99 (ms) | E2E p50 (ms) | E2E p99 (ms) "
             "| prefix-cache hit rate | errors | requests per replica |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        split = " / ".join(str(n) for _, n in sorted(r.per_replica.items()))
        lines.append(f"| {r.policy} | {r.ttft_p50_ms:.0f} | {r.ttft_p99_ms:.0f} | "
                     f"{r.e2e_p50_ms:.0f} | {r.e2e_p99_ms:.0f} | {r.prefix_hit_rate:.1%} | "
                     f"{r.errors}/{r.requests} | {split} |")
    return "\n".join(lines)


def main() -> None:
    """Start engines (unless given), replay once per policy, print and write results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replica", action="append", default=[],
                   help="use running engines instead of starting --engines of them")
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--engine-arg", action="append", default=[],
                   help="`strata engine` argument (repeat); default: --threads 1")
    p.add_argument("--kv-tokens", type=int, default=6144, help="KV cache per engine, tokens")
    p.add_argument("--engine-block-size", type=int, default=0,
                   help="engine KV block tokens; default: the scaled trace block, at most 16")
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--requests", type=int, default=400,
                   help="prefix reuse grows with the window: 13%% of blocks in 400, 4%% in 100")
    p.add_argument("--start-s", type=float, default=0.0, help="trace window start")
    p.add_argument("--rate", type=float, default=1.5, help="mean requests/s after re-timing")
    p.add_argument("--length-factor", type=float, default=1 / 64)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--max-output", type=int, default=16)
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--data-dir", default=str(default_data_dir()))
    p.add_argument("--out", default=str(ROOT / "results" / "routing_mooncake.json"))
    args = p.parse_args()
    out = Path(args.out)
    logs = out.parent / "routing-mooncake-logs"
    logs.mkdir(parents=True, exist_ok=True)
    trace = prepare_trace(args)
    recs = trace.records
    print(f"trace: {len(recs)} requests over {trace.duration_s:.0f} s; prompt tokens mean "
          f"{sum(r.input_tokens for r in recs) / len(recs):.0f}, block {trace.block_tokens} "
          f"tokens; transforms: {', '.join(trace.transforms)}", flush=True)
    synth = PromptSynthesizer(load_bench_tokenizer(None), verify=False)
    results: list[PolicyResult] = []
    with ExitStack() as stack:
        engines = list(args.replica)
        # Engine KV blocks as large as the scaled trace block: a shared prefix shorter than
        # one engine block could never be served from the prefix cache.
        block_size = args.engine_block_size or min(16, trace.block_tokens or 16)
        for i in range(0 if engines else args.engines):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            start(stack, [sys.executable, "-m", "strata.cli", "engine", "--host", "127.0.0.1",
                          "--port", str(port), "--max-model-len", str(args.max_context),
                          "--block-size", str(block_size),
                          "--num-kv-blocks", str(args.kv_tokens // block_size),
                          *(args.engine_arg or ["--threads", "1"])],
                  url, logs / f"engine{i}.log", 900)
            engines.append(url)
        model = httpx.get(engines[0] + "/v1/models", timeout=10).json()["data"][0]["id"]
        for k, policy in enumerate(args.policies):
            wait_idle(engines)
            with ExitStack() as gw_stack:
                port = free_port()
                gw = f"http://127.0.0.1:{port}"
                start(gw_stack, [sys.executable, "-m", "strata.gateway.cli", "--port", str(port),
                                 "--policy", policy, "--poll-interval-s", "0.1",
                                 "--prefix-chunk-tokens", str(trace.block_tokens or 64),
                                 "--read-timeout-s", str(args.timeout_s),
                                 *sum((["--replica", e] for e in engines), [])],
                      gw, logs / f"gateway-{policy}.log", 60)
                time.sleep(1.0)  # first health checks and load reports
                outcomes, wall = asyncio.run(replay(gw, trace, synth, model,
                                                    (k + 1) * _POLICY_SALT, args.timeout_s))
            result = summarize(policy, outcomes, wall)
            results.append(result)
            print(f"  {policy:16s} TTFT p50 {result.ttft_p50_ms:7.0f} ms  p99 "
                  f"{result.ttft_p99_ms:7.0f} ms  hit {result.prefix_hit_rate:6.1%}  "
                  f"errors {result.errors}", flush=True)
            failed = [o.error for o in outcomes if not o.ok][:3]
            if failed:
                print("    first errors:", failed, flush=True)
    md = table(results)
    print(md)
    out.write_text(json.dumps({
        "benchmark": "routing_mooncake", "command": " ".join(sys.argv), "args": vars(args),
        "trace": {"requests": len(recs), "duration_s": trace.duration_s,
                  "block_tokens": trace.block_tokens, "length_factor": trace.length_factor,
                  "clipped_requests": trace.clipped_requests,
                  "transforms": list(trace.transforms)},
        "results": [asdict(r) for r in results], "table": md}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
