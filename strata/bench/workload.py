"""From command-line choices to the exact list of requests a run will send.

The order is fixed and recorded: load (validate) -> window (trace clock) -> rate scale ->
time scale -> synthetic re-timing -> first N -> fit lengths to the context -> prompts.
The length factor is chosen on the whole trace, so every window of it uses the same one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from strata.bench import arrivals as arr
from strata.bench import traces
from strata.bench.client import RequestSpec
from strata.bench.prompts import PromptSynthesizer, Tokenizer
from strata.bench.traces import Trace

# Prompts are verified by re-encoding: all of the first ones, then a sample, because the
# safe-vocabulary construction makes a failure systematic rather than occasional.
_VERIFY_FIRST = 64
_VERIFY_EVERY = 16


@dataclass(frozen=True)
class WorkloadOptions:
    """What to replay; see ``strata bench --help`` for each field."""

    trace: str = "synthetic"
    data_dir: Path | None = None
    skip_bad_rows: bool = False
    arrivals: str = "trace"
    rate: float | None = None
    burstiness: float = 1.0
    duration_s: float | None = None
    input_tokens: int = 256
    output_tokens: int = 128
    rate_scale: float = 1.0
    time_scale: float = 1.0
    window: tuple[float, float | None] | None = None
    max_requests: int | None = None
    length_factor: float | None = None
    max_context: int = 8192
    seed: int = 0


def parse_window(text: str | None) -> tuple[float, float | None] | None:
    """``START:END`` in trace seconds (END may be empty) to a pair."""
    if not text:
        return None
    start, sep, end = text.partition(":")
    if not sep:
        raise ValueError(f"--window must be START:END in seconds, got {text!r}")
    try:
        return float(start or 0), (float(end) if end else None)
    except ValueError as err:
        raise ValueError(f"--window must be START:END in seconds, got {text!r}") from err


def build_trace(opts: WorkloadOptions) -> Trace:
    """The trace to replay, with every transform applied and recorded."""
    if opts.arrivals not in ("trace", "poisson", "gamma", "constant"):
        raise ValueError("--arrivals must be trace, poisson, gamma or constant, "
                         f"got {opts.arrivals!r}")
    synthetic_arrivals = opts.arrivals != "trace"
    if synthetic_arrivals and opts.rate is None:
        raise ValueError(f"--arrivals {opts.arrivals} needs --rate (requests/s)")
    if opts.trace == "synthetic":
        if not synthetic_arrivals:
            raise ValueError("--trace synthetic needs --arrivals poisson, gamma or constant")
        times = _synthetic_times(opts, _synthetic_count(opts))
        trace = arr.synthetic_trace(times, opts.input_tokens, opts.output_tokens,
                                    _arrivals_label(opts))
        return traces.fit_lengths(trace, 1.0, opts.max_context)
    full = traces.load_trace(opts.trace, opts.data_dir, opts.skip_bad_rows)
    factor = opts.length_factor or traces.auto_length_factor(full, opts.max_context)
    trace = full
    if opts.window:
        trace = traces.window(trace, *opts.window)
    if opts.rate_scale != 1.0:
        trace = traces.scale_rate(trace, opts.rate_scale, opts.seed)
    if opts.time_scale != 1.0:
        trace = traces.scale_time(trace, opts.time_scale)
    if synthetic_arrivals:
        times = _synthetic_times(opts, min(len(trace.records), _synthetic_count(opts)))
        trace = arr.retime(trace, times, _arrivals_label(opts))
    if opts.max_requests:
        trace = traces.head(trace, opts.max_requests)
    if not trace.records:
        raise ValueError("the chosen window/limits leave no request to send")
    return traces.fit_lengths(trace, factor, opts.max_context)


def _synthetic_times(opts: WorkloadOptions, n: int) -> list[float]:
    rate = opts.rate or 0.0
    if opts.arrivals == "constant":
        return arr.constant_arrivals(rate, n)
    burst = opts.burstiness if opts.arrivals == "gamma" else 1.0
    return arr.gamma_arrivals(rate, n, burst, opts.seed)


def _arrivals_label(opts: WorkloadOptions) -> str:
    if opts.arrivals == "gamma":
        return f"gamma {opts.rate:g}/s cv {opts.burstiness:g}"
    return f"{opts.arrivals} {opts.rate:g}/s"


def _synthetic_count(opts: WorkloadOptions) -> int:
    if opts.duration_s is not None:
        return arr.count_for_duration(opts.rate or 0.0, opts.duration_s)
    if opts.max_requests is not None:
        return opts.max_requests
    if opts.trace != "synthetic":
        return 1 << 62  # every record of the trace, re-timed
    raise ValueError("synthetic load needs --duration or --max-requests")


def build_specs(trace: Trace, synthesizer: PromptSynthesizer, prompt_format: str,
                on_progress: Callable[[int], None] | None = None) -> tuple[list[RequestSpec],
                                                                            int]:
    """Synthesize every prompt before the clock starts; returns specs and how many verified.

    Building prompts ahead keeps tokenizer work out of the timed run, so it cannot make
    the client late.
    """
    if prompt_format not in ("text", "ids"):
        raise ValueError(f"--prompt-format must be text or ids, got {prompt_format!r}")
    specs: list[RequestSpec] = []
    verified = 0
    for i, rec in enumerate(trace.records):
        check = prompt_format == "text" and (i < _VERIFY_FIRST or i % _VERIFY_EVERY == 0)
        synthesizer.verify = check
        prompt = synthesizer.prompt(rec.input_tokens, i, rec.hash_ids, trace.block_tokens)
        verified += int(check)
        body: str | list[int] = prompt.text if prompt_format == "text" else list(
            prompt.token_ids)
        blocks = 0
        if trace.block_tokens:
            blocks = min(len(rec.hash_ids), -(-rec.input_tokens // trace.block_tokens))
        specs.append(RequestSpec(i, rec.arrival_s, body, rec.input_tokens, rec.output_tokens,
                                 blocks))
        if on_progress:
            on_progress(i + 1)
    return specs, verified


def make_synthesizer(tokenizer: Tokenizer, seed: int) -> PromptSynthesizer:
    """A synthesizer for this run (separate so tests can share one across runs)."""
    return PromptSynthesizer(tokenizer, seed=seed)
