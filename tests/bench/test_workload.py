"""From options to requests: transform order, synthetic load, prompt specs."""

from __future__ import annotations

import pytest

from strata.bench.prompts import PromptSynthesizer
from strata.bench.workload import WorkloadOptions, build_specs, build_trace, parse_window


def test_parse_window() -> None:
    assert parse_window("60:120") == (60.0, 120.0)
    assert parse_window("30:") == (30.0, None)
    with pytest.raises(ValueError, match="START:END"):
        parse_window("60")


def test_trace_pipeline_records_every_transform() -> None:
    trace = build_trace(WorkloadOptions(trace="mooncake", window=(0.0, 600.0), rate_scale=0.5,
                                        time_scale=0.1, max_requests=50))
    assert len(trace.records) == 50 and trace.length_factor == 0.0625
    assert trace.block_tokens == 32 and trace.records[-1].arrival_s < 60.0
    assert trace.transforms[:4] == ("window 0:600", "rate x0.5", "time x0.1", "first 50")


def test_synthetic_and_retimed_trace() -> None:
    synth = build_trace(WorkloadOptions(arrivals="gamma", rate=10, burstiness=2,
                                        duration_s=3, input_tokens=20, output_tokens=5))
    assert len(synth.records) == 30 and synth.records[0].input_tokens == 20
    retimed = build_trace(WorkloadOptions(trace="azure-code", arrivals="constant", rate=4,
                                          max_requests=9))
    assert [r.arrival_s for r in retimed.records][:3] == [0.0, 0.25, 0.5]
    with pytest.raises(ValueError, match="needs --rate"):
        build_trace(WorkloadOptions(arrivals="poisson"))


def test_specs_carry_exact_prompts_and_blocks(synthesizer: PromptSynthesizer) -> None:
    trace = build_trace(WorkloadOptions(trace="mooncake", max_requests=3))
    specs, verified = build_specs(trace, synthesizer, "ids")
    assert verified == 0 and [len(s.prompt) for s in specs] == [
        r.input_tokens for r in trace.records]
    assert specs[0].prefix_blocks == len(trace.records[0].hash_ids)
    assert specs[0].prompt[:32] == specs[1].prompt[:32]  # both start with hash id 0
    text_specs, verified = build_specs(trace, synthesizer, "text")
    assert verified == 3 and isinstance(text_specs[0].prompt, str)
