"""Builders for routing test states."""

from __future__ import annotations

from typing import Any

from strata.load import LoadReport
from strata.routing.types import ReplicaState, RouteRequest


def report(**kw: Any) -> LoadReport:
    """A LoadReport of an idle, measured replica, with fields overridden by ``kw``."""
    base: dict[str, Any] = dict(
        model="m", running=0, waiting=0, waiting_prompt_tokens=0, free_kv_blocks=1000,
        total_kv_blocks=1000, block_size=16, max_num_seqs=64, max_num_batched_tokens=2048,
        prefix_hit_rate=0.0, prompt_tokens_per_s=10000.0, generation_tokens_per_s=500.0,
        decode_step_s=0.02, prefill_token_s=1e-4)
    base.update(kw)
    return LoadReport(**base)


def replica(url: str, load: LoadReport | None = None, **kw: Any) -> ReplicaState:
    """A ReplicaState; running/waiting/kv_usage mirror ``load`` unless given."""
    if load is not None:
        kw.setdefault("running", load.running)
        kw.setdefault("waiting", load.waiting)
        kw.setdefault("kv_usage", load.kv_usage)
    return ReplicaState(url=url, load=load, **kw)


def request(prompt_tokens: int = 100, max_tokens: int = 32, **kw: Any) -> RouteRequest:
    """A RouteRequest for model 'm'."""
    return RouteRequest(model="m", prompt_tokens=prompt_tokens, max_tokens=max_tokens, **kw)
