"""Only replica and load gauges are kept from a Prometheus exposition."""

from __future__ import annotations

from strata.bench.scrape import select_samples

TEXT = """# HELP strata_tier_replicas Replicas per tier.
# TYPE strata_tier_replicas gauge
strata_tier_replicas{tier="engine"} 3.0
strata_tier_replicas{tier="stage-0"} 2.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 7.0
# TYPE http_requests counter
http_requests_total 99.0
"""


def test_select_samples_keeps_replicas_and_running() -> None:
    assert select_samples(TEXT) == {
        'strata_tier_replicas{tier="engine"}': 3.0,
        'strata_tier_replicas{tier="stage-0"}': 2.0,
        'vllm:num_requests_running{model_name="m"}': 7.0,
    }
