"""Summary statistics of a run: percentiles, throughput, goodput, SLO attainment. Pure.

Definitions (the same as vLLM's and guidellm's, so numbers can be compared):

- TTFT: send to first non-empty token chunk. TPOT: (E2E - TTFT) / (output tokens - 1),
  per request. ITL: gaps between successive token chunks, pooled over all requests.
- Duration: first send to last completion. Throughputs count completed requests only.
- A request meets the SLOs when it completed, TTFT <= the TTFT SLO and TPOT <= the TPOT SLO
  (a one-token answer has no TPOT and meets that half). Goodput is such requests per
  second; attainment is their share of all requests sent, failures included.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from strata.bench.results import LatencyStats, RequestRecord, Summary


def latency_stats(values_s: Sequence[float]) -> LatencyStats:
    """Mean, p50, p90, p99 and max of latencies given in seconds, reported in ms."""
    if len(values_s) == 0:
        return LatencyStats(count=0, mean_ms=None, p50_ms=None, p90_ms=None, p99_ms=None,
                            max_ms=None)
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return LatencyStats(count=len(arr), mean_ms=float(arr.mean()), p50_ms=float(p50),
                        p90_ms=float(p90), p99_ms=float(p99), max_ms=float(arr.max()))


def meets_slo(record: RequestRecord, slo_ttft_ms: float, slo_tpot_ms: float) -> bool:
    """Whether one request completed within both the TTFT and the TPOT objective."""
    if record.status != "ok" or record.ttft_s is None:
        return False
    if record.ttft_s * 1000.0 > slo_ttft_ms:
        return False
    return record.tpot_s is None or record.tpot_s * 1000.0 <= slo_tpot_ms


def run_duration_s(records: Sequence[RequestRecord]) -> float:
    """From the first send to the last completion (or failure)."""
    if not records:
        return 0.0
    start = min(r.sent_s for r in records)
    end = max(r.sent_s + (r.e2e_s or 0.0) for r in records)
    return max(end - start, 1e-9)


def summarize(records: Sequence[RequestRecord], slo_ttft_ms: float, slo_tpot_ms: float,
              ignore_eos_sent: bool, lag_threshold_ms: float = 50.0) -> Summary:
    """The run's headline numbers from its per-request records."""
    ok = [r for r in records if r.status == "ok"]
    duration = run_duration_s(records)
    good = sum(1 for r in records if meets_slo(r, slo_ttft_ms, slo_tpot_ms))
    lag = latency_stats([max(r.lag_s, 0.0) for r in records])
    errors = Counter(f"{r.status}:{r.http_status}" if r.http_status else r.status
                     for r in records if r.status != "ok")
    ignored = sum(1 for r in ok if ignore_eos_sent and r.finish_reason == "stop"
                  and r.output_tokens < r.max_tokens)
    mismatches = sum(1 for r in ok if r.server_prompt_tokens is not None
                     and r.server_prompt_tokens != r.prompt_tokens)
    per_second = 1.0 / duration if duration > 0 else 0.0
    return Summary(
        requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration,
        request_throughput=len(ok) * per_second,
        output_token_throughput=sum(r.output_tokens for r in ok) * per_second,
        input_token_throughput=sum(r.prompt_tokens for r in ok) * per_second,
        goodput=good * per_second,
        slo_attainment=good / len(records) if records else 0.0,
        slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms,
        ttft=latency_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=latency_stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl=latency_stats([gap for r in ok for gap in r.itl_s]),
        e2e=latency_stats([r.e2e_s for r in ok if r.e2e_s is not None]),
        schedule_lag=lag,
        fell_behind=bool(lag.p99_ms is not None and lag.p99_ms > lag_threshold_ms),
        lag_threshold_ms=lag_threshold_ms,
        ignore_eos_sent=ignore_eos_sent,
        ignore_eos_ignored=ignored,
        prompt_token_mismatches=mismatches,
        errors=dict(errors),
    )
