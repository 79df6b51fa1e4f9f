from __future__ import annotations

from strata.gateway.probe import MetricsLoad, parse_metrics

VLLM = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting_by_reason{reason="capacity"} 99.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:prompt_tokens_total{model_name="m"} 12345.0
"""


def test_vllm_series_are_summed_and_usage_maxed() -> None:
    assert parse_metrics(VLLM) == MetricsLoad(running=5, waiting=4, kv_usage=0.5)


def test_old_vllm_and_sglang_names_and_timestamps() -> None:
    old = b"vllm:gpu_cache_usage_perc 0.75 1700000000000\nvllm:num_requests_running 1\n"
    assert parse_metrics(old) == MetricsLoad(running=1, waiting=0, kv_usage=0.75)
    sgl = b'sglang:num_running_reqs{tp="0"} 7\nsglang:num_queue_reqs{tp="0"} 2\nsglang:token_usage{tp="0"} 0.1\n'
    assert parse_metrics(sgl) == MetricsLoad(running=7, waiting=2, kv_usage=0.1)


def test_no_known_series_means_none() -> None:
    assert parse_metrics(b"strata_fake_requests_running 3\n# nothing\n") is None
    assert parse_metrics(b"vllm:num_requests_waiting_by_reason 3\n") is None
