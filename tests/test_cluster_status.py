"""The status payload and tables from plain facts (what the cluster gathers for /admin/status)."""

from __future__ import annotations

import io
import time

from rich.console import Console

from strata.cluster_status import (
    ClusterFacts,
    ReplicaFacts,
    TierFacts,
    render_status,
    status_payload,
)
from strata.load import LoadReport
from strata.platform.base import Replica


def _facts() -> ClusterFacts:
    now = time.monotonic()
    load = LoadReport("m", running=3, waiting=1, waiting_prompt_tokens=40, free_kv_blocks=75,
                      total_kv_blocks=100, block_size=16, max_num_seqs=64,
                      max_num_batched_tokens=512, prefix_hit_rate=0.0, prompt_tokens_per_s=100.0,
                      generation_tokens_per_s=20.0, decode_step_s=0.01, prefill_token_s=0.0)
    up = Replica("engine", "engine-0", "ready", "http://127.0.0.1:9001", started_at=now - 30,
                 ready_at=now - 20, pid=4242)
    backoff = Replica("engine", "engine-1", "backoff", None, started_at=now - 5, restarts=2,
                      last_exit="exit 1")
    tier = TierFacts("engine", "engine", None, 1, 3, "llm", 2, 1, None,
                     [ReplicaFacts(up, in_flight=4, load=load), ReplicaFacts(backoff)])
    decision = {"time": time.time(), "tier": "engine", "policy": "llm", "source": "scrape",
                "current": 1, "desired": 2, "reason": "ttft above slo",
                "metrics": {"kv_usage": 0.25}}
    return ClusterFacts("http://127.0.0.1:8000", 90.0, "resource_match", "scrape", 15.0,
                        {"ttft_s": 2.0}, [tier], [decision])


def test_payload_joins_platform_and_gateway_facts() -> None:
    payload = status_payload(_facts())
    (tier,) = payload["tiers"]
    assert (tier["policy"], tier["desired"], tier["ready"], tier["min"], tier["max"]) == \
        ("llm", 2, 1, 1, 3)
    up, backoff = tier["replicas"]
    assert (up["id"], up["pid"], up["in_flight"], up["running"], up["waiting"]) == \
        ("engine-0", 4242, 4, 3, 1)
    assert up["kv_usage"] == 0.25 and up["tokens_per_s"] == 120.0
    assert 19 < up["ready_for_s"] < 30 and up["age_s"] >= 30
    assert backoff["running"] is None and backoff["restarts"] == 2
    assert payload["decisions"][0]["desired"] == 2 and payload["uptime_s"] == 90.0


def test_tables_show_every_replica_and_decision() -> None:
    out = io.StringIO()
    render_status(status_payload(_facts()), Console(file=out, width=200))
    text = out.getvalue()
    assert "engine-0" in text and "backoff (exit 1)" in text
    assert "1 -> 2" in text and "ttft above slo" in text and "kv_usage=0.25" in text
