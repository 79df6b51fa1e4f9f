"""The cpu-local performance profile: strata's own engine, measured on this machine, fitted.

``strata simulate profile`` builds a real ``EngineCore`` (the bundled model unless told
otherwise, with the thread count the engines use) and times ``EngineCore.step()``, the
whole iteration the engine thread runs (schedule, prepare, forward, sample, detokenize),
over a sweep of batches: prefill chunks of several lengths and offsets, decode batches of
1 to 48 sequences at several context lengths, and mixed steps. Each sample records the
batch's features (``strata.sim.perf_model.StepFeatures``) and is fitted by least squares
with non-negative coefficients (a negative one is dropped and the fit redone).

It also measures, with a real ``strata engine`` process: the start-up time (spawn to a
passing ``/health``) and the per-request overhead outside the engine loop (HTTP, JSON,
tokenization, streaming), as the median of TTFT minus the fitted step time for short
prompts with ``max_tokens`` 1.
"""

from __future__ import annotations

import json
import math
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

from strata.sim.perf_model import FEATURES, LinearCost, StepFeatures, feature_row


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


def fit(samples: list[tuple[StepFeatures, float]]) -> tuple[dict[str, float], float]:
    """Non-negative least squares of *relative* error, by elimination; returns R^2 too.

    Rows are weighted by 1 / measured time so that short decode steps count as much as long
    prefills; a coefficient that comes out negative is dropped and the fit redone.
    """
    x = np.array([feature_row(f) for f, _ in samples], dtype=np.float64)
    y = np.array([t for _, t in samples], dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-6)
    xw, yw = x * w[:, None], y * w
    active = list(range(len(FEATURES)))
    coef = np.zeros(len(FEATURES))
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
    return {name: float(c) for name, c in zip(FEATURES, coef, strict=True)}, 1.0 - ss_res / ss_tot


# -- measuring the engine in-process --------------------------------------------------------


@dataclass(frozen=True)
class ProfileOptions:
    """Engine options to profile with (match the cluster file's ``engine`` section)."""

    model: str | None = None
    threads: int = 1
    dtype: str = "auto"
    block_size: int = 16
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    kv_cache_bytes: int = 1 << 30
    decode_batches: tuple[int, ...] = (1, 4, 12, 32)
    contexts: tuple[int, ...] = (64, 384, 1024)
    prefill_lengths: tuple[int, ...] = (16, 96, 256, 512, 900)
    repeats: int = 2


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def measure_steps(opts: ProfileOptions, log: Callable[[str], None] = print
                  ) -> tuple[list[tuple[StepFeatures, float]], dict[str, Any]]:
    """Time EngineCore.step() over the sweep; returns samples and engine facts."""
    import torch

    from strata.engine.engine import EngineConfig, build_engine_core
    from strata.engine.sampling import SamplingParams

    core = build_engine_core(EngineConfig(
        model=opts.model, threads=opts.threads, dtype=opts.dtype, block_size=opts.block_size,
        kv_cache_bytes=opts.kv_cache_bytes, max_num_seqs=opts.max_num_seqs,
        max_num_batched_tokens=opts.max_num_batched_tokens))
    sched = core.scheduler
    batches: list[Any] = []
    original_step = sched.step

    def capturing_step() -> Any:
        batch = original_step()
        batches.append(batch)
        return batch

    sched.step = capturing_step  # type: ignore[method-assign]
    samples: list[tuple[StepFeatures, float]] = []
    vocab = core.runner.model.config.vocab_size
    rng = np.random.default_rng(0)
    ids = iter(range(1 << 30))

    def add(prompt: list[int], max_tokens: int) -> None:
        core.add(next(ids), prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                   ignore_eos=True), time.monotonic())

    def prompt_of(n: int) -> list[int]:
        return rng.integers(100, vocab - 1, n).tolist()

    def step(record: bool = True) -> None:
        batches.clear()
        t = time.perf_counter()
        core.step()
        dt = time.perf_counter() - t
        if record and batches and batches[0]:
            samples.append((StepFeatures.of(batches[0]), dt))

    def drain() -> None:
        while core.has_work:
            step()

    def decode_job(b: int, ctx: int) -> None:
        # One sequence prefills the shared prompt; the others then hit the prefix cache,
        # so the sweep times long-context decodes without paying b long prefills.
        prompt = prompt_of(ctx)
        add(prompt, 14)
        while not batches or not any(e.samples for e in batches[0].entries):
            step()
        for _ in range(b - 1):
            add(prompt, 6)
        drain()

    def mixed_job(b: int) -> None:
        prompt = prompt_of(128)
        for _ in range(b):
            add(prompt, 16)
        step()
        step()
        add(prompt_of(300), 2)
        drain()

    add(prompt_of(32), 4)
    while core.has_work:
        step(record=False)  # warm-up
    jobs: list[tuple[str, int, int]] = []
    for _ in range(opts.repeats):
        jobs += [("prefill", n, 0) for n in opts.prefill_lengths]
        jobs += [("decode", b, c) for b in opts.decode_batches for c in opts.contexts
                 if b * (c + 16) <= core.blocks.num_blocks * opts.block_size]
        jobs += [("mixed", b, 0) for b in opts.decode_batches[:3]]
    # Interleaved, so that a burst of load on a shared machine spreads over the sweep.
    order = rng.permutation(len(jobs))
    for done, i in enumerate(order, start=1):
        kind, a, b = jobs[int(i)]
        if kind == "prefill":
            add(prompt_of(a), 2)
            drain()
        elif kind == "decode":
            decode_job(a, b)
        else:
            mixed_job(a)
        if done % 10 == 0 or done == len(jobs):
            log(f"  {done}/{len(jobs)} batches, {len(samples)} steps timed")
    facts = {
        "dtype": str(core.runner.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "kv_bytes_per_token": float(core.runner.kv_caches[0][0].element_size() * 2
                                    * core.runner.model.num_layers
                                    * core.runner.model.config.num_key_value_heads
                                    * core.runner.model.config.head_size),
        "model": core.model_name,
    }
    return samples, facts


# -- measuring a real engine process --------------------------------------------------------


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_command(port: int, opts: ProfileOptions) -> list[str]:
    """The ``strata engine`` command line for these options."""
    cmd = [sys.executable, "-m", "strata.cli", "engine", "--port", str(port),
           "--threads", str(opts.threads), "--dtype", opts.dtype,
           "--block-size", str(opts.block_size),
           "--max-num-seqs", str(opts.max_num_seqs),
           "--max-num-batched-tokens", str(opts.max_num_batched_tokens),
           "--kv-cache", str(opts.kv_cache_bytes), "--log-level", "warning"]
    if opts.model:
        cmd += ["--model", opts.model]
    return cmd


def start_engine(port: int, opts: ProfileOptions, timeout_s: float = 300.0
                 ) -> tuple[subprocess.Popen[bytes], float]:
    """Spawn an engine process and wait for /health; returns it and the start-up seconds."""
    import httpx

    t0 = time.perf_counter()
    proc = subprocess.Popen(engine_command(port, opts), stdout=subprocess.DEVNULL,
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


def measure_overhead(port: int, cost: LinearCost, n: int = 12) -> float:
    """Median client TTFT minus the modelled engine step, for one-token answers."""
    import httpx

    prompt = " ".join(["hello"] * 15)
    prompt_tokens = 16
    step = cost.step_s(StepFeatures(prefill_tokens=prompt_tokens,
                                    prefill_pairs=prompt_tokens * (prompt_tokens + 1) / 2,
                                    sampled=1))
    gaps = []
    with httpx.Client(timeout=60.0) as client:
        for i in range(n + 2):
            body = {"prompt": prompt, "max_tokens": 1, "stream": True,
                    "temperature": 0.0, "ignore_eos": True}
            t = time.perf_counter()
            with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions",
                               json=body) as resp:
                resp.raise_for_status()
                for _ in resp.iter_lines():
                    pass
            if i >= 2:  # the first requests warm the tokenizer and the HTTP stack
                gaps.append(time.perf_counter() - t - step)
    return max(0.0, statistics.median(gaps))


def run_profile(opts: ProfileOptions, with_process: bool = True,
                log: Callable[[str], None] = print) -> CpuProfile:
    """Measure and fit the cpu-local profile (a few minutes on two cores)."""
    log("timing EngineCore.step() over prefill, decode and mixed batches ...")
    samples, facts = measure_steps(opts, log)
    coefficients, r2 = fit(samples)
    log(f"fit over {len(samples)} steps: R^2 = {r2:.3f}")
    startup = overhead = math.nan
    if with_process:
        port = free_port()
        log("starting a real engine process for start-up and request overhead ...")
        proc, startup = start_engine(port, opts)
        try:
            overhead = measure_overhead(port, LinearCost(coefficients))
        finally:
            stop_engine(proc)
        log(f"start-up {startup:.1f} s, request overhead {overhead * 1000:.1f} ms")
    raw = tuple({**{k: float(v) for k, v in zip(FEATURES[1:], feature_row(f)[1:], strict=True)},
                 "seconds": t} for f, t in samples)
    return CpuProfile(
        model=facts["model"], threads=facts["threads"], dtype=facts["dtype"], cpu=_cpu_name(),
        coefficients=coefficients, startup_s=0.0 if math.isnan(startup) else startup,
        request_overhead_s=0.0 if math.isnan(overhead) else overhead,
        kv_bytes_per_token=facts["kv_bytes_per_token"], r2=r2, samples=len(samples),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"), raw=raw)
