"""One benchmark run end to end: workload -> prompts -> load -> summary -> result file.

Callable from Python (tests, benchmark scripts) as well as from ``strata bench``; the
terminal niceties (progress bar, tables) are optional hooks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from strata.bench.client import ClientOptions, RequestSpec, discover_model, run_load
from strata.bench.metrics import summarize
from strata.bench.prompts import PromptSynthesizer, Tokenizer
from strata.bench.results import BenchConfig, BenchResult, RequestRecord
from strata.bench.workload import WorkloadOptions, build_specs, build_trace


@dataclass(frozen=True)
class RunOptions:
    """How to run the load and judge it."""

    concurrency: int | None = None
    prompt_format: str = "text"
    tokenizer_name: str | None = None
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: float = 200.0
    lag_threshold_ms: float = 50.0


@dataclass
class Hooks:
    """Optional progress callbacks for a terminal front end."""

    on_prompts: Callable[[int, int], None] | None = None  # (done, total) while synthesizing
    on_start: Callable[[int], None] | None = None  # total requests, when the clock starts
    on_done: Callable[[RequestRecord], None] | None = None


def run_benchmark(workload: WorkloadOptions, client: ClientOptions, run: RunOptions,
                  tokenizer: Tokenizer | PromptSynthesizer,
                  hooks: Hooks | None = None) -> BenchResult:
    """Build the workload, replay it against the target and summarize the result."""
    hooks = hooks or Hooks()
    if run.prompt_format == "ids" and client.api == "chat":
        raise ValueError("--prompt-format ids works with --api completions only")
    trace = build_trace(workload)
    synthesizer = tokenizer if isinstance(tokenizer, PromptSynthesizer) else \
        PromptSynthesizer(tokenizer, seed=workload.seed)
    total = len(trace.records)
    on_prompts = hooks.on_prompts
    specs, verified = build_specs(
        trace, synthesizer, run.prompt_format,
        (lambda i: on_prompts(i, total)) if on_prompts else None)
    if client.model == "auto":
        client = replace(client, model=asyncio.run(discover_model(client)))
    if hooks.on_start:
        hooks.on_start(len(specs))
    started = datetime.now(UTC).isoformat(timespec="seconds")
    output = asyncio.run(run_load(specs, client, run.concurrency, hooks.on_done))
    summary = summarize(output.records, run.slo_ttft_ms, run.slo_tpot_ms, client.ignore_eos,
                        run.lag_threshold_ms)
    notes: list[str] = []
    if workload.skip_bad_rows and trace.bad_rows:
        notes.append(f"skipped {len(trace.bad_rows)} invalid trace row(s), first at line "
                     f"{trace.bad_rows[0].line}")
    if output.scrape_errors and not output.timeseries:
        notes.append(f"target /metrics unavailable ({output.scrape_last_error}); "
                     "no replica time series")
    if trace.length_factor != 1.0 or trace.clipped_requests:
        notes.append(f"prompt lengths scaled x{trace.length_factor:g}"
                     + (f" (prefix block {trace.block_tokens} tokens)" if trace.block_tokens
                        else "")
                     + f"; {trace.clipped_requests} request(s) clipped to "
                       f"{workload.max_context} tokens")
    config = BenchConfig(
        target=client.target, api=client.api, model=client.model, trace=trace.name,
        arrivals=workload.arrivals,
        mode="open-loop" if run.concurrency is None else "closed-loop",
        concurrency=run.concurrency, rate=workload.rate,
        burstiness=workload.burstiness if workload.arrivals == "gamma" else None,
        rate_scale=workload.rate_scale, time_scale=workload.time_scale,
        window=_window_text(workload.window), max_requests=workload.max_requests,
        seed=workload.seed, length_factor=trace.length_factor,
        max_context=workload.max_context, block_tokens=trace.block_tokens,
        clipped_requests=trace.clipped_requests, bad_rows_skipped=len(trace.bad_rows),
        transforms=list(trace.transforms), prompt_format=run.prompt_format,
        tokenizer=run.tokenizer_name, prompts_verified=verified, ignore_eos=client.ignore_eos,
        slo_ttft_ms=run.slo_ttft_ms, slo_tpot_ms=run.slo_tpot_ms, started_at=started)
    return BenchResult(config=config, summary=summary, requests=output.records,
                       timeseries=output.timeseries, metrics_scrape_errors=output.scrape_errors,
                       notes=notes)


def _window_text(window: tuple[float, float | None] | None) -> str | None:
    if window is None:
        return None
    start, end = window
    return f"{start:g}:{'' if end is None else f'{end:g}'}"


__all__ = ["Hooks", "RequestSpec", "RunOptions", "run_benchmark"]
