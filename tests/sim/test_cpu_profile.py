"""cpu-local profile: the fit recovers known costs; files round-trip; the CLI uses them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from strata.sim.cpu_profile import CpuProfile, fit, prefill_chunks
from strata.sim.perf_model import FEATURES, LinearCost, StepFeatures
from strata.sim.replica_cost import build_replica_model


def test_fit_recovers_a_linear_cost_model() -> None:
    truth = {"const": 0.02, "prefill_tokens": 0.004, "prefill_pairs": 2e-6, "decodes": 0.003,
             "decode_ctx": 5e-6, "decode_padded": 0.0, "sampled": 0.001}
    cost = LinearCost(truth)
    rng = random.Random(0)
    samples = []
    for _ in range(200):
        n = rng.choice([0, 16, 64, 300, 512])
        d = rng.randint(0 if n else 1, 32)
        ctx = rng.randint(10, 900)
        f = StepFeatures(prefill_tokens=n, prefill_pairs=n * (n + 1) / 2, decodes=d,
                         decode_ctx=d * ctx, sampled=d + (1 if n else 0), decode_max_ctx=ctx)
        samples.append((f, cost.step_s(f) * rng.uniform(0.98, 1.02)))
    overhead = 0.15
    requests = []
    for n in (16, 128, 512, 1000, 1500):
        chunks = prefill_chunks(n, 512)
        requests.append((chunks, sum(cost.step_s(f) for f in chunks) + overhead))
    coef, fitted_overhead, r2 = fit(samples, requests)
    assert r2 > 0.99
    assert fitted_overhead == pytest.approx(overhead, rel=0.15)
    assert set(coef) == set(FEATURES) and all(v >= 0 for v in coef.values())
    for name in ("const", "prefill_tokens", "decodes"):
        assert coef[name] == pytest.approx(truth[name], rel=0.1)


def profile(tmp_path: Path) -> Path:
    coef = {"const": 0.05, "prefill_tokens": 0.004, "prefill_pairs": 1e-6, "decodes": 0.002,
            "decode_ctx": 1e-6, "decode_padded": 0.0, "sampled": 0.0}
    p = CpuProfile(model="smollm2", threads=1, dtype="float32", cpu="test", coefficients=coef,
                   startup_s=12.0, request_overhead_s=0.004, kv_bytes_per_token=46080.0, r2=0.97,
                   samples=10, raw=({"prefill_tokens": 1.0, "seconds": 0.05},))
    path = tmp_path / "cpu.json"
    path.write_text(p.to_json())
    return path


def test_prefill_chunks_follow_the_token_budget() -> None:
    chunks = prefill_chunks(1100, 512)
    assert [(c.prefill_tokens, c.prefill_ctx, c.sampled) for c in chunks] == \
        [(512, 0, 0), (512, 512, 0), (76, 1024, 1)]


def test_profile_round_trips_into_a_replica_model(tmp_path: Path) -> None:
    path = profile(tmp_path)
    loaded = CpuProfile.load(path)
    assert loaded.raw == ({"prefill_tokens": 1.0, "seconds": 0.05},)
    rm = build_replica_model("cpu-local", "smollm2-135m", profile_path=path)
    assert rm.startup_s == 12.0 and rm.request_overhead_s == 0.004 and rm.kv_tokens is None
    assert rm.cost.step_s(StepFeatures(decodes=1, decode_ctx=10, sampled=1)) == \
        pytest.approx(0.05 + 0.002 + 1e-5)
    with pytest.raises(FileNotFoundError, match="strata simulate profile"):
        CpuProfile.load(tmp_path / "missing.json")


@pytest.mark.parametrize("attention", ["decode_ctx", "decode_padded"])
def test_mixed_context_decodes_tell_summed_from_padded_attention(attention: str) -> None:
    # The profile's decode batches: half the streams at ctx // 4, half at ctx. With one
    # context for all, the two attention features are proportional and the fit splits the
    # cost between them arbitrarily.
    truth = {"const": 0.02, "prefill_tokens": 0.003, "prefill_pairs": 0.0, "decodes": 0.0,
             "decode_ctx": 0.0, "decode_padded": 0.0, "sampled": 0.005}
    truth[attention] = 1e-5
    cost = LinearCost(truth)
    samples = []
    for b in (1, 4, 16):
        for ctx in (64, 256, 768):
            for i in range(6, 12):
                lens = [ctx // 4 + i] * (b // 2) + [ctx + i] * (b - b // 2)
                f = StepFeatures(decodes=b, decode_ctx=sum(lens), sampled=b,
                                 decode_max_ctx=ctx + i)
                samples.append((f, cost.step_s(f)))
    requests = [(prefill_chunks(n, 512), sum(cost.step_s(f) for f in prefill_chunks(n, 512))
                 + 0.05) for n in (16, 128, 512, 1000)]
    coef, _, _ = fit(samples, requests)
    other = "decode_padded" if attention == "decode_ctx" else "decode_ctx"
    assert coef[attention] == pytest.approx(1e-5, rel=0.05)
    assert coef[other] < 1e-7
