"""The cpu-local performance profile: strata's own engine, measured on this machine, fitted.

``strata simulate profile`` starts a real ``strata engine`` process (the bundled model
unless told otherwise, with the thread count and dtype the engines use) and measures it
*as served*, through its OpenAI API, because serving costs what an in-process loop does
not: the HTTP thread competes with the engine thread for the GIL and the cores. Two kinds
of observation, in a shuffled order so a burst of load on a shared machine spreads out:

* **decode steps**: ``B`` concurrent streams of cached prompts, half of ``ctx // 4`` tokens
  and half of ``ctx`` (a warm-up request puts each in the prefix cache, so they start
  together without ``B`` long prefills); once all decode, the gap between consecutive
  tokens of a stream is one iteration with ``B`` decodes whose longest context is
  ``ctx + i`` (median over the streams). Mixed lengths let the fit separate attention
  over the summed contexts (a paged kernel) from attention over a padded batch;
* **prefills**: a fresh prompt of ``n`` tokens with ``max_tokens`` 1; the time to the end of
  its stream is the per-request overhead (HTTP, JSON, queues) plus the prefill chunks the
  scheduler cuts it into.

Both are fitted jointly by least squares on relative error with non-negative coefficients
(``fit``): the iteration model of ``strata.sim.perf_model.LinearCost`` plus a per-request
overhead. The start-up time is spawn to a passing ``/health``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from strata.engine.options import EngineOptions
from strata.sim.perf_model import FEATURES, StepFeatures, feature_row


@dataclass(frozen=True)
class CpuProfile:
    """What ``strata simulate profile`` measured: the fit, start-up and request overhead."""

    model: str
    threads: int
    dtype: str
    cpu: str
    coefficients: dict[str, float]
    startup_s: float
    request_overhead_s: float
    kv_bytes_per_token: float
    r2: float
    samples: int
    measured_at: str = ""
    raw: tuple[dict[str, float], ...] = ()

    def to_json(self) -> str:
        """The profile file's text."""
        d = asdict(self)
        d["raw"] = list(self.raw)
        return json.dumps(d, indent=1)

    @classmethod
    def load(cls, path: Path) -> CpuProfile:
        """Read a profile written by ``strata simulate profile``."""
        if not path.is_file():
            raise FileNotFoundError(
                f"no cpu-local profile at {path}; run `strata simulate profile --output "
                f"{path}` first (a few minutes)")
        data: dict[str, Any] = json.loads(path.read_text())
        missing = [k for k in FEATURES if k not in data.get("coefficients", {})]
        if missing:
            raise ValueError(f"{path}: coefficients lack {missing}; re-run the profile")
        data["raw"] = tuple(data.get("raw", ()))
        return cls(**data)


def fit(samples: list[tuple[StepFeatures, float]],
        requests: list[tuple[list[StepFeatures], float]] = ()  # type: ignore[assignment]
        ) -> tuple[dict[str, float], float, float]:
    """Non-negative least squares of *relative* error, by elimination.

    ``samples`` are single iterations; ``requests`` are whole one-token requests (their
    prefill chunks plus one per-request overhead). Rows are weighted by 1 / measured time
    so that short decode steps count as much as long prefills; a coefficient that comes out
    negative is dropped and the fit redone. Returns the coefficients, the per-request
    overhead and R^2 over all rows.
    """
    rows = [[*feature_row(f), 0.0] for f, _ in samples]
    ys = [t for _, t in samples]
    for chunks, t in requests:
        summed = [sum(col) for col in zip(*(feature_row(f) for f in chunks), strict=True)]
        rows.append([*summed, 1.0])
        ys.append(t)
    x = np.array(rows, dtype=np.float64)
    y = np.array(ys, dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-6)
    xw, yw = x * w[:, None], y * w
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(xw[:, active], yw, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0.0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    pred = x @ coef
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    coefficients = {name: float(c) for name, c in zip(FEATURES, coef[:-1], strict=True)}
    return coefficients, float(coef[-1]), 1.0 - ss_res / ss_tot


# -- options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileOptions:
    """Engine options to profile with (match the cluster file's ``engine`` section)."""

    model: str | None = None
    threads: int = 1
    dtype: str = "float32"  # fixed, not "auto": auto measures at start-up and may differ
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    kv_cache_bytes: int = 1 << 30
    decode_batches: tuple[int, ...] = (1, 4, 16)
    contexts: tuple[int, ...] = (64, 256, 768)
    decode_tokens: int = 12
    prefill_lengths: tuple[int, ...] = (16, 128, 512, 1000)
    repeats: int = 2


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def prefill_chunks(n: int, budget: int) -> list[StepFeatures]:
    """The chunks the scheduler cuts a lone n-token prompt into (the last one samples)."""
    out = []
    start = 0
    while start < n:
        k = min(budget, n - start)
        out.append(StepFeatures(prefill_tokens=k, prefill_pairs=k * start + k * (k + 1) / 2,
                                prefill_ctx=start, sampled=1 if start + k == n else 0))
        start += k
    return out


# -- measuring a real engine process --------------------------------------------------------


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_command(port: int, opts: ProfileOptions) -> list[str]:
    """The ``strata engine`` command line for these options."""
    engine = EngineOptions(block_size=opts.block_size, max_num_seqs=opts.max_num_seqs,
                           max_num_batched_tokens=opts.max_num_batched_tokens,
                           kv_cache=opts.kv_cache_bytes)
    cmd = [sys.executable, "-m", "strata.cli", "engine", "--port", str(port),
           "--threads", str(opts.threads), "--dtype", opts.dtype,
           *engine.kv_and_batch_args(), "--log-level", "warning"]
    if opts.model:
        cmd += ["--model", opts.model]
    return cmd


def start_engine(port: int, opts: ProfileOptions, timeout_s: float = 300.0
                 ) -> tuple[subprocess.Popen[bytes], float]:
    """Spawn an engine process and wait for /health; returns it and the start-up seconds."""
    import httpx

    t0 = time.perf_counter()
    proc = subprocess.Popen(engine_command(port, opts), stdout=subprocess.DEVNULL,  # nosec B603
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/health"
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            raise RuntimeError(f"engine exited with {proc.returncode}: {err}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_engine(proc)
    raise TimeoutError(f"engine on port {port} not healthy after {timeout_s:.0f} s")


def stop_engine(proc: subprocess.Popen[bytes]) -> None:
    """Terminate an engine process this module started, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


async def _stream(client: Any, url: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Send one streamed completion; returns its start and each token chunk's arrival."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
            "ignore_eos": True}
    times = [time.perf_counter()]
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: {") and '"choices":[]' not in line.replace(" ", ""):
                times.append(time.perf_counter())
    times.append(time.perf_counter())  # end of stream
    return times


async def _measure(port: int, opts: ProfileOptions, vocab: int, log: Callable[[str], None]
                   ) -> tuple[list[tuple[StepFeatures, float]],
                              list[tuple[list[StepFeatures], float]]]:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    rng = np.random.default_rng(0)
    steps: list[tuple[StepFeatures, float]] = []
    requests: list[tuple[list[StepFeatures], float]] = []

    def prompt_of(n: int) -> list[int]:
        return rng.integers(100, vocab - 1, n).tolist()

    jobs: list[tuple[str, int, int]] = []
    for _ in range(opts.repeats):
        jobs += [("prefill", n, 0) for n in opts.prefill_lengths]
        jobs += [("decode", b, c) for b in opts.decode_batches for c in opts.contexts]
    order = rng.permutation(len(jobs))
    async with httpx.AsyncClient(timeout=600.0) as client:
        for _ in range(3):  # warm the tokenizer, the HTTP stack and the model
            await _stream(client, url, prompt_of(32), 2)
        for done, i in enumerate(order, start=1):
            kind, a, b = jobs[int(i)]
            if kind == "prefill":
                t = await _stream(client, url, prompt_of(a), 1)
                requests.append((prefill_chunks(a, opts.max_num_batched_tokens), t[-1] - t[0]))
            else:
                # Half the streams (rounded down) share a prompt of b tokens, the rest one of
                # b // 4: with one context for all, the sum of contexts and the padded
                # batch x longest context are proportional and the fit cannot tell them
                # apart, yet the engine's attention costs one or the other depending on
                # its decode kernel.
                long_prompt, short_prompt = prompt_of(b), prompt_of(max(1, b // 4))
                await _stream(client, url, long_prompt, 1)  # now in the prefix cache
                await _stream(client, url, short_prompt, 1)
                prompts = [short_prompt if j < a // 2 else long_prompt for j in range(a)]
                m = opts.decode_tokens
                streams = await asyncio.gather(*(_stream(client, url, pr, m)
                                                 for pr in prompts))
                # Token i (1-based) of every stream comes from the i-th shared step; from
                # the second half on, all a sequences are decoding.
                for i in range(max(2, m // 2), m):
                    gaps = [s[i + 1] - s[i] for s in streams if len(s) > i + 1]
                    if len(gaps) == a:
                        ctx_sum = sum(len(pr) + i for pr in prompts)
                        steps.append((StepFeatures(decodes=a, decode_ctx=ctx_sum, sampled=a,
                                                   decode_max_ctx=b + i),
                                      statistics.median(gaps)))
            log(f"  {done}/{len(jobs)} {kind} {a} {b}")
    return steps, requests


def run_profile(opts: ProfileOptions, log: Callable[[str], None] = print) -> CpuProfile:
    """Start an engine, measure it as served, fit the cpu-local profile (a few minutes)."""
    from strata.engine.weights import load_config, resolve_model

    path = resolve_model(opts.model)
    config = load_config(path)
    port = free_port()
    log(f"starting strata engine on port {port} ...")
    proc, startup = start_engine(port, opts)
    log(f"ready after {startup:.1f} s; measuring decode steps and prefills ...")
    try:
        steps, requests = asyncio.run(_measure(port, opts, config.vocab_size, log))
    finally:
        stop_engine(proc)
    coefficients, overhead, r2 = fit(steps, requests)
    log(f"fit over {len(steps)} steps and {len(requests)} requests: R^2 = {r2:.3f}")
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads \
        * config.head_size * {"float32": 4, "bfloat16": 2, "float16": 2}.get(opts.dtype, 4)
    raw = tuple({**dict(zip(FEATURES[1:], feature_row(f)[1:], strict=True)), "seconds": t}
                for f, t in steps)
    raw += tuple({"request_prefill_tokens": float(sum(c.prefill_tokens for c in chunks)),
                  "seconds": t} for chunks, t in requests)
    return CpuProfile(
        model=path.name, threads=opts.threads, dtype=opts.dtype, cpu=_cpu_name(),
        coefficients=coefficients, startup_s=startup, request_overhead_s=overhead,
        kv_bytes_per_token=float(kv_per_token), r2=r2, samples=len(steps) + len(requests),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"), raw=raw)
