"""Small simulated setups shared by the simulator tests."""

from __future__ import annotations

import random

import pytest

from strata.sim.cluster import SimSetup
from strata.sim.perf_model import ReplicaModel
from strata.sim.replica_cost import build_replica_model
from strata.sim.types import EngineSettings, SimRequest


@pytest.fixture(scope="session")
def a100_13b() -> ReplicaModel:
    """LLaMA-2-13B on one A100 (the paper's replica)."""
    return build_replica_model("a100-80g", "llama-2-13b")


def make_setup(replica: ReplicaModel, **kw: object) -> SimSetup:
    """A one-tier setup with a small engine; keyword arguments override SimSetup fields."""
    engine = kw.pop("engine", None) or EngineSettings(
        num_blocks=400, block_size=16, max_num_seqs=16, max_num_batched_tokens=512,
        max_model_len=4096, prefix_caching=True)
    return SimSetup(replica=replica, engine=engine, **kw)  # type: ignore[arg-type]


def random_requests(n: int, rate: float, seed: int = 1, max_prompt: int = 1500,
                    max_output: int = 300) -> list[SimRequest]:
    """Poisson arrivals with uniform lengths: a reproducible little workload."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate)
        out.append(SimRequest(i, t, rng.randint(1, max_prompt), rng.randint(1, max_output)))
    return out
