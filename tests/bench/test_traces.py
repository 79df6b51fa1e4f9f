"""Trace loading, validation with line numbers, windows and scaling."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.bench import traces
from strata.bench.traces import Trace, TraceError, TraceRecord

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_named_traces_load_rebased_with_provenance() -> None:
    code = traces.load_trace("azure-code")
    assert len(code.records) == 8819 and code.records[0].arrival_s == 0.0
    assert 3400 < code.duration_s < 3500 and code.block_tokens is None
    moon = traces.load_trace("mooncake")
    assert moon.block_tokens == 512 and moon.records[0].hash_ids[0] == 0
    assert traces.auto_length_factor(moon, 8192) == 0.0625


def test_bad_azure_rows_reported_with_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.csv", AZURE_HEADER
                  + "2023-11-16 18:15:46.6805900,374,44\n"
                  + "2023-11-16 18:15:47.0000000,-3,44\n"       # line 3: negative
                  + "not a time,10,10\n"                        # line 4: timestamp
                  + "2023-11-16 18:15:48.0000000,12\n"          # line 5: columns
                  + "2023-11-16 18:15:40.0000000,12,5\n"        # line 6: backwards
                  + "2023-11-16 18:15:49.5000000,100,7\n")
    with pytest.raises(TraceError) as info:
        traces.load_trace(path)
    assert [b.line for b in info.value.bad_rows] == [3, 4, 5, 6]
    assert "line 3: ContextTokens" in str(info.value)
    kept = traces.load_trace(path, skip_bad_rows=True)
    assert [r.line for r in kept.records] == [2, 7] and len(kept.bad_rows) == 4
    assert kept.records[1].arrival_s == pytest.approx(49.5 - 46.68059)


def test_bad_mooncake_rows_and_header(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.jsonl",
                  '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}\n'
                  '{"timestamp": 5, "input_length": 600, "output_length": 5, "hash_ids": [0]}\n'
                  '{"timestamp": 6, "input_length": 10, "output_length": 0}\n'
                  "{oops\n"
                  '{"timestamp": 9, "input_length": 10, "output_length": 3, "hash_ids": [7]}\n')
    with pytest.raises(TraceError) as info:
        traces.load_trace(path)
    assert [b.line for b in info.value.bad_rows] == [2, 3, 4]
    assert "hash_ids" in info.value.bad_rows[0].reason
    with pytest.raises(ValueError, match="header"):
        traces.load_trace(_write(tmp_path, "h.csv", "a,b,c\n1,2,3\n"))


def _even(n: int, gap: float = 1.0) -> Trace:
    recs = tuple(TraceRecord(i * gap, 100, 10, line=i + 2) for i in range(n))
    return Trace(name="t", records=recs)


def test_window_time_and_rate_scaling() -> None:
    trace = _even(1000)
    win = traces.window(trace, 100, 200)
    assert len(win.records) == 100 and win.records[0].arrival_s == 0.0
    assert traces.scale_time(win, 0.5).duration_s == pytest.approx(49.5)
    dense = traces.scale_rate(trace, 2.5, seed=1)
    assert len(dense.records) == pytest.approx(2500, rel=0.05)
    assert dense.duration_s <= trace.duration_s + 1e-9  # same timeline, denser
    thin = traces.scale_rate(trace, 0.25, seed=1)
    assert len(thin.records) == pytest.approx(250, rel=0.15)
    assert traces.scale_rate(trace, 0.25, seed=1) == thin  # seeded
    assert len(traces.head(trace, 7).records) == 7
    assert thin.transforms == ("rate x0.25",)
    with pytest.raises(ValueError, match="window"):
        traces.window(trace, 5, 5)


def test_fit_lengths_scales_blocks_and_clips() -> None:
    recs = (TraceRecord(0, 4096, 100, (1,) * 8), TraceRecord(1, 100_000, 9000, (2,) * 196))
    fitted = traces.fit_lengths(Trace("m", recs, block_tokens=512), 0.25, 8192)
    assert fitted.block_tokens == 128 and fitted.length_factor == 0.25
    assert fitted.records[0].input_tokens == 1024 and fitted.records[0].output_tokens == 100
    second = fitted.records[1]
    assert second.output_tokens == 8191 and second.input_tokens == 1
    assert fitted.clipped_requests == 1
