"""Percentiles, throughput, goodput and SLO attainment on hand-made records."""

from __future__ import annotations

import pytest

from strata.bench.metrics import latency_stats, meets_slo, summarize
from strata.bench.results import RequestRecord


def _rec(i: int, ttft: float, tpot: float | None, out: int = 11, status: str = "ok",
         sent: float = 0.0, finish: str = "length") -> RequestRecord:
    e2e = ttft + (tpot or 0.0) * (out - 1)
    return RequestRecord(index=i, scheduled_s=sent, sent_s=sent + 0.001 * i, status=status,
                         ttft_s=ttft if status == "ok" else None, e2e_s=e2e, tpot_s=tpot,
                         itl_s=[tpot or 0.0] * (out - 1), prompt_tokens=100,
                         server_prompt_tokens=100, output_tokens=out, max_tokens=11,
                         finish_reason=finish)


def test_latency_stats_percentiles() -> None:
    stats = latency_stats([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats.count == 100 and stats.p50_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1) and stats.p99_ms == pytest.approx(99.01)
    assert stats.max_ms == pytest.approx(100.0) and latency_stats([]).p50_ms is None


def test_goodput_attainment_and_throughput() -> None:
    records = [
        _rec(0, 0.1, 0.05),                      # meets both
        _rec(1, 3.0, 0.05),                      # TTFT too slow
        _rec(2, 0.1, 0.5),                       # TPOT too slow
        _rec(3, 0.1, None, out=1),               # one token: no TPOT, meets
        _rec(4, 0.0, None, status="error"),      # failed
    ]
    assert meets_slo(records[3], 2000, 200) and not meets_slo(records[4], 2000, 200)
    s = summarize(records, slo_ttft_ms=2000, slo_tpot_ms=200, ignore_eos_sent=True)
    duration = max(r.sent_s + r.e2e_s for r in records) - 0.0
    assert s.duration_s == pytest.approx(duration)
    assert s.completed == 4 and s.failed == 1 and s.errors == {"error": 1}
    assert s.goodput == pytest.approx(2 / duration)
    assert s.slo_attainment == pytest.approx(2 / 5)
    assert s.request_throughput == pytest.approx(4 / duration)
    assert s.output_token_throughput == pytest.approx((11 * 3 + 1) / duration)
    assert s.ttft.count == 4 and s.tpot.count == 3 and not s.fell_behind


def test_ignore_eos_and_lag_detection() -> None:
    late = [_rec(i, 0.1, 0.01, out=5, finish="stop") for i in range(100)]
    late = [r.model_copy(update={"sent_s": r.scheduled_s + 0.2}) for r in late]
    s = summarize(late, 2000, 200, ignore_eos_sent=True, lag_threshold_ms=50)
    assert s.ignore_eos_ignored == 100 and s.fell_behind
    assert s.schedule_lag.p99_ms == pytest.approx(200.0)
    assert summarize(late, 2000, 200, ignore_eos_sent=False).ignore_eos_ignored == 0
