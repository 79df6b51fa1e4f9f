"""Stage pipelines against the single engine on this machine, plus the transport's cost.

Every server process is pinned to cores with ``taskset`` and runs one torch thread per
core it owns, so the configurations share the same cores:

- ``engine``: one ``strata engine`` process on all cores (``--threads`` = cores);
- ``2-stage``: head ``0:15`` on core 0, stage ``15:30`` on core 1;
- ``2-stage-balanced``: the split balanced by measured per-layer cost (the LM head is
  counted in the last stage), head on core 0, the rest on core 1;
- ``2-stage-replicated``: the heavier stage (``15:30``: 15 layers plus the LM head)
  replicated, one replica on core 1 and one sharing core 0 with the head (on a 2-core
  machine there is no third core to give it).

All configurations are started at once (an idle one costs no CPU) and measured in turn,
in interleaved rounds, so that other work on the machine hits them alike; the tables
show the median over rounds. Closed-loop streamed load at each concurrency: prompts of exactly ``--input-tokens``
tokens, ``--output-tokens`` outputs with EOS ignored, greedy. For the pipelines, the
head's ``/stages`` timing at concurrency 1 gives the per-step round trip minus all
stages' compute: the transport's share of a step. A micro-benchmark then sends frames
of ``[T, hidden]`` fp32 hidden states over loopback TCP and compares the one-way cost
with a ``memcpy`` of the same bytes.

    python benchmarks/stages.py                       # ~10 min on 2 cores
    python benchmarks/stages.py --concurrency 1,8 --output-tokens 32

Writes ``results/stages_bench.json`` and prints markdown tables for docs/results.md.
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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import torch

from strata.bench.metrics import summarize
from strata.bench.prompts import PromptSynthesizer, load_bench_tokenizer
from strata.bench.results import RequestRecord
from strata.engine.weights import bundled_model_path, load_config
from strata.stages import links
from strata.stages import transport as tp
from strata.stages.plan import balanced_split, stage_costs
from strata.stages.profile import measure_layer_costs

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Proc:
    """One server process of a configuration."""

    role: str
    cores: str
    argv: list[str]
    url: str = ""
    popen: subprocess.Popen | None = None


@dataclass
class Config:
    """A serving configuration: its processes (the first serves the OpenAI API)."""

    name: str
    procs: list[Proc]
    split: str = ""


@dataclass
class Level:
    """One configuration at one concurrency."""

    config: str
    concurrency: int
    round: int
    completed: int
    errors: int
    output_tokens_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    timing: dict[str, float] = field(default_factory=dict)
    stage_busy: dict[str, float] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(p: Proc, log_dir: Path) -> None:
    port = _free_port()
    p.url = f"http://127.0.0.1:{port}"
    argv = ["taskset", "-c", p.cores, sys.executable, *p.argv, "--host", "127.0.0.1",
            "--port", str(port)]
    log = open(log_dir / f"{p.role}-{port}.log", "w")  # noqa: SIM115 - closed with the process
    threads = str(len(p.cores.split(",")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads}
    p.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait(p: Proc, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert p.popen is not None
        if p.popen.poll() is not None:
            raise RuntimeError(f"{p.role} exited with {p.popen.returncode}; see its log")
        try:
            if httpx.get(p.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{p.role} not healthy after {timeout_s} s")


def _stop(p: Proc) -> None:
    if p.popen is not None and p.popen.poll() is None:
        p.popen.terminate()
        try:
            p.popen.wait(15)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()


def launch(cfg: Config, log_dir: Path) -> None:
    """Start the stages first, then the head (which connects them), and wait for all."""
    downstream, head = cfg.procs[1:], cfg.procs[0]
    for p in downstream:
        _start(p, log_dir)
    for p in downstream:
        _wait(p)
    for p in downstream:
        head.argv += ["--replica", p.url]
    _start(head, log_dir)
    _wait(head)


# ---------------------------------------------------------------- load


async def _stream_one(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                      index: int, prompt_tokens: int, t0: float) -> RequestRecord:
    start = time.perf_counter()
    base: dict[str, Any] = {"index": index, "scheduled_s": start - t0, "sent_s": start - t0,
                            "prompt_tokens": prompt_tokens, "max_tokens": body["max_tokens"]}
    times: list[float] = []
    usage: dict[str, Any] | None = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status >= 400:
                return RequestRecord(**base, status="error", http_status=resp.status,
                                     error=(await resp.text())[:300])
            pending = b""
            async for data in resp.content.iter_any():
                now = time.perf_counter() - start
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    payload = line[5:].strip() if line.startswith(b"data:") else b""
                    if not payload or payload == b"[DONE]":
                        continue
                    event = json.loads(payload)
                    usage = event.get("usage") or usage
                    if any(c.get("text") for c in event.get("choices") or []):
                        times.append(now)
    except (aiohttp.ClientError, TimeoutError) as err:
        return RequestRecord(**base, status="error", error=str(err))
    e2e = time.perf_counter() - start
    if not times:
        return RequestRecord(**base, status="error", error="no tokens", e2e_s=e2e)
    n = int(usage["completion_tokens"]) if usage else len(times)
    return RequestRecord(**base, status="ok", http_status=200, ttft_s=times[0], e2e_s=e2e,
                         tpot_s=(e2e - times[0]) / (n - 1) if n > 1 else None,
                         server_prompt_tokens=int(usage["prompt_tokens"]) if usage else None,
                         output_tokens=n, finish_reason="length")


async def closed_loop(url: str, prompts: list[list[int]], concurrency: int,
                      max_tokens: int) -> list[RequestRecord]:
    """Keep `concurrency` streamed requests in flight until every prompt was sent."""
    queue = iter(enumerate(prompts))
    records: list[RequestRecord] = []
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()

        async def worker() -> None:
            for i, ids in queue:
                body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
                        "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                records.append(await _stream_one(session, url + "/v1/completions", body, i,
                                                 len(ids), t0))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


def _snapshot(cfg: Config) -> tuple[dict[str, float], dict[str, float]]:
    """Cumulative head step timing and each stage replica's busy seconds."""
    if len(cfg.procs) == 1:
        return {}, {}
    head = cfg.procs[0]
    totals = httpx.get(head.url + "/stages", timeout=10).json()["head"]["timing_totals"]
    busy = {p.role: float(httpx.get(p.url + "/load", timeout=10).json()["busy_s_total"])
            for p in cfg.procs[1:]}
    return totals, busy


def run_level(cfg: Config, prompts: list[list[int]], c: int, max_tokens: int, rnd: int) -> Level:
    """One concurrency level; per-step timing and busy ratios are this level's own."""
    head = cfg.procs[0]
    t_before, b_before = _snapshot(cfg)
    t0 = time.perf_counter()
    recs = asyncio.run(closed_loop(head.url, prompts, c, max_tokens))
    wall = time.perf_counter() - t0
    t_after, b_after = _snapshot(cfg)
    s = summarize(recs, slo_ttft_ms=1e9, slo_tpot_ms=1e9, ignore_eos_sent=True)
    timing: dict[str, float] = {}
    if t_after:
        steps = t_after["steps"] - t_before["steps"]
        timing = {k: (t_after[k] - t_before[k]) / max(steps, 1.0) for k in t_after if k != "steps"}
        timing["steps"] = steps
        timing["transport_and_wait_s"] = max(0.0, timing["round_trip_s"] - timing["stages_compute_s"])
    busy = {k: (b_after[k] - b_before[k]) / wall for k in b_after}
    return Level(cfg.name, c, rnd, s.completed, s.failed, s.output_token_throughput,
                 s.ttft.p50_ms, s.ttft.p99_ms, s.tpot.p50_ms, s.tpot.p99_ms, timing, busy)


def _median(values: list[float]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    return vals[len(vals) // 2] if vals else None


def aggregate(levels: list[Level]) -> list[Level]:
    """Median over rounds of every number, per configuration and concurrency."""
    out: list[Level] = []
    keys: list[tuple[str, int]] = []
    for r in levels:
        if (r.config, r.concurrency) not in keys:
            keys.append((r.config, r.concurrency))
    for name, c in keys:
        rs = [r for r in levels if r.config == name and r.concurrency == c]
        timing = {k: _median([r.timing[k] for r in rs]) or 0.0 for k in rs[0].timing}
        busy = {k: _median([r.stage_busy[k] for r in rs]) or 0.0 for k in rs[0].stage_busy}
        out.append(Level(
            name, c, len(rs), sum(r.completed for r in rs), sum(r.errors for r in rs),
            _median([r.output_tokens_s for r in rs]) or 0.0,
            _median([r.ttft_p50_ms for r in rs]), _median([r.ttft_p99_ms for r in rs]),
            _median([r.tpot_p50_ms for r in rs]), _median([r.tpot_p99_ms for r in rs]),
            timing, busy))
    return out


# ---------------------------------------------------------------- transport


async def _one_way_us(tokens: int, hidden: int, reps: int) -> tuple[int, float]:
    """Median µs from `send` to the frame decoded at the receiver (same process, loopback)."""
    got: asyncio.Queue[float] = asyncio.Queue()

    async def sink(conn: tp.Connection) -> None:
        while await conn.recv() is not None:
            got.put_nowait(time.perf_counter())

    server = await links.serve("127.0.0.1", 0, sink)
    conn = await links.connect("127.0.0.1", server.sockets[0].getsockname()[1])
    frame = tp.Frame(tp.STEP, 1, {"seq_ids": list(range(min(tokens, 64)))}, {
        "hidden": torch.randn(tokens, hidden),
        "positions": torch.arange(tokens), "slots": torch.arange(tokens),
    })
    samples = []
    for _ in range(reps + 3):
        t = time.perf_counter()
        await conn.send(frame)
        samples.append(await got.get() - t)
    conn.close()
    server.close()
    samples = sorted(samples[3:])
    return frame.nbytes, samples[len(samples) // 2] * 1e6


def _memcpy_us(nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 3):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    times = sorted(times[3:])
    return times[len(times) // 2] * 1e6


def transport_table(hidden: int, sizes: list[int], reps: int) -> list[dict[str, float]]:
    """Frame one-way cost vs memcpy, per token count."""
    rows = []
    for t in sizes:
        nbytes, us = asyncio.run(_one_way_us(t, hidden, reps))
        rows.append({"tokens": t, "bytes": nbytes, "frame_us": us, "memcpy_us": _memcpy_us(nbytes, reps)})
    return rows


# ---------------------------------------------------------------- configs and output


def configs(model: Path, split_at: int, layers: int, cores: int) -> list[Config]:
    """The four configurations of this machine."""
    common = ["--model", str(model), "--dtype", "float32", "--threads", "1"]
    kv = ["--num-kv-blocks", "512", "--max-model-len", "2048"]
    all_cores = ",".join(str(i) for i in range(cores))
    engine = Config("engine", [Proc("engine", all_cores, ["-m", "strata.cli", "engine",
                    "--model", str(model), "--dtype", "float32", "--threads", str(cores), *kv])])

    def pipe(name: str, a: int, replicas: list[str]) -> Config:
        head = Proc("head", "0", ["-m", "strata.stages.cli", "--layers", f"0:{a}", *common, *kv])
        rest = [Proc(f"{a}:{layers}#{i}", c, ["-m", "strata.stages.cli", "--layers",
                     f"{a}:{layers}", *common]) for i, c in enumerate(replicas)]
        return Config(name, [head, *rest], f"0:{a} + {a}:{layers}" + (f" x{len(replicas)}" if len(replicas) > 1 else ""))

    return [
        engine,
        pipe("2-stage", layers // 2, ["1"]),
        pipe("2-stage-balanced", split_at, ["1"]),
        pipe("2-stage-replicated", layers // 2, ["1", "0"]),
    ]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def markdown(levels: list[Level], transport: list[dict[str, float]], cfgs: list[Config],
             header: list[str]) -> str:
    """Tables for docs/results.md."""
    split = {c.name: c.split or "0:30 (one process)" for c in cfgs}
    out = [*header, "",
           "| config | split | c | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | stage busy |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in levels:
        busy = ", ".join(f"{v:.2f}" for v in r.stage_busy.values()) or "-"
        out.append(f"| {r.config} | {split[r.config]} | {r.concurrency} | {r.output_tokens_s:.1f} | "
                   f"{_ms(r.ttft_p50_ms)} | {_ms(r.ttft_p99_ms)} | {_ms(r.tpot_p50_ms)} | "
                   f"{_ms(r.tpot_p99_ms)} | {busy} |")
    out += ["", "Per step at concurrency 1 (head's `/stages` timing, mean over the level's steps, prefill included; transport + waits = round trip - compute of all stages):", "",
            "| config | head compute ms | all stages compute ms | round trip ms | transport + waits ms | bytes sent per step |",
            "|---|--:|--:|--:|--:|--:|"]
    for r in levels:
        t = r.timing
        if r.concurrency == 1 and t:
            out.append(f"| {r.config} | {t['head_compute_s'] * 1e3:.1f} | {t['stages_compute_s'] * 1e3:.1f} | "
                       f"{t['round_trip_s'] * 1e3:.1f} | {t['transport_and_wait_s'] * 1e3:.2f} | {t['sent_bytes']:.0f} |")
    out += ["", "Transport micro-benchmark (one frame over loopback TCP, send to decoded, same process):", "",
            "| tokens | payload bytes | frame one-way µs | memcpy µs | ratio |", "|--:|--:|--:|--:|--:|"]
    for row in transport:
        out.append(f"| {row['tokens']} | {row['bytes']} | {row['frame_us']:.0f} | {row['memcpy_us']:.1f} | "
                   f"{row['frame_us'] / max(row['memcpy_us'], 1e-3):.0f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """Run every configuration, print and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=0, help="per level; 0: 2 x c, at least 3")
    ap.add_argument("--configs", default="", help="comma-separated names to run (default all)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--output", type=Path, default=REPO / "results" / "stages_bench.json")
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        raise SystemExit("this benchmark pins stages to two cores; run it with at least 2")
    torch.set_num_threads(1)
    model = bundled_model_path()
    layers = load_config(model).num_hidden_layers
    print("measuring per-layer cost (1 thread, 8 tokens) ...", flush=True)
    costs = measure_layer_costs(model, batch_tokens=8)
    split = balanced_split(costs, 2)
    print(f"  layer {sum(costs.layer_s) / layers * 1e3:.1f} ms, LM head {costs.head_s * 1e3:.1f} ms "
          f"-> balanced split {split}, stage costs "
          f"{[round(x * 1e3, 1) for x in stage_costs(costs, split)]} ms", flush=True)
    conc = [int(x) for x in args.concurrency.split(",")]
    synth = PromptSynthesizer(load_bench_tokenizer(None), seed=1, verify=True)
    n_max = max(args.requests or max(2 * c, 3) for c in conc)
    prompts = [list(synth.token_ids(args.input_tokens, i)) for i in range(n_max)]
    cfgs = configs(model, split[0][1], layers, min(cores, 2))
    if args.configs:
        keep = set(args.configs.split(","))
        cfgs = [c for c in cfgs if c.name in keep]
    log_dir = args.output.parent / "stages_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    levels: list[Level] = []
    try:
        # All configurations run at once (idle ones cost no CPU) and are measured in turn,
        # round after round, so that other load on the machine hits them all alike.
        for cfg in cfgs:
            print(f"starting {cfg.name} ({cfg.split or 'one process'})", flush=True)
            launch(cfg, log_dir)
        for rnd in range(args.rounds):
            for cfg in cfgs:
                for c in conc:
                    n = args.requests or max(2 * c, 3)
                    r = run_level(cfg, prompts[:n], c, args.output_tokens, rnd)
                    levels.append(r)
                    print(f"  round {rnd} {cfg.name} c={c}: {r.output_tokens_s:.1f} tok/s, "
                          f"TTFT p50 {_ms(r.ttft_p50_ms)} ms, TPOT p50 {_ms(r.tpot_p50_ms)} ms, "
                          f"errors {r.errors}, busy {r.stage_busy}", flush=True)
                    if r.errors:
                        raise SystemExit(f"{cfg.name}: {r.errors} requests failed; see {log_dir}")
    finally:
        for cfg in cfgs:
            for p in cfg.procs:
                _stop(p)
    hidden = load_config(model).hidden_size
    transport = transport_table(hidden, [1, 8, 64, 512], reps=50)
    load = os.getloadavg()
    header = [f"Measured {datetime.now(UTC):%Y-%m-%d} on {cores} cores "
              f"(load average {load[0]:.1f} at the end: other work shared the machine), "
              f"bundled SmolLM2-135M fp32, {args.input_tokens}-token prompts, "
              f"{args.output_tokens} output tokens, greedy, streamed; median of "
              f"{args.rounds} interleaved rounds; `python benchmarks/stages.py`."]
    md = markdown(aggregate(levels), transport, cfgs, header)
    print(md)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "when": datetime.now(UTC).isoformat(), "cores": cores, "load_average": load,
        "costs": {"layer_s": list(costs.layer_s), "embed_s": costs.embed_s, "head_s": costs.head_s},
        "balanced_split": split, "levels": [asdict(x) for x in levels], "transport": transport,
        "markdown": md,
    }, indent=2))


if __name__ == "__main__":
    main()
