"""Performance model: roofline numbers, decode runs in closed form, shapes, pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strata.sim.hardware import HARDWARE, ModelCosts, load_model_shape
from strata.sim.perf_model import (
    LinearCost,
    PipelineCost,
    RooflineCost,
    StepFeatures,
)
from strata.sim.replica_cost import build_replica_model


def decode_features(b: int, ctx: int) -> StepFeatures:
    return StepFeatures(decodes=b, decode_ctx=ctx, sampled=b, decode_max_ctx=ctx // b)


def test_llama2_13b_shape_counts_13b_parameters() -> None:
    costs = ModelCosts.of(load_model_shape("llama-2-13b"))
    total = costs.weight_params(0, costs.layers)
    assert 12.9e9 < total < 13.1e9
    # 2 (K and V) x 40 layers x 5120 x 2 bytes
    assert costs.kv_bytes_per_token(40, 2.0) == 819_200


def test_small_decode_on_a100_is_bound_by_reading_the_weights() -> None:
    cost = RooflineCost(HARDWARE["a100-80g"], ModelCosts.of(load_model_shape("llama-2-13b")))
    t = cost.step_s(decode_features(1, 100))
    weights = cost.weight_bytes / (2.0e12 * 0.8)
    assert t == pytest.approx(weights + 0.002, rel=0.01)
    # H100's bandwidth makes the same step faster; a long prefill is compute-bound.
    h100 = RooflineCost(HARDWARE["h100-80g"], cost.model)
    assert h100.step_s(decode_features(1, 100)) < t
    n = 2048
    prefill = StepFeatures(prefill_tokens=n, prefill_pairs=n * (n + 1) / 2, sampled=1)
    flops = 2 * cost.model.layer_params * 40 * n
    assert cost.step_s(prefill) > flops / (312e12 * 0.6)


def test_tensor_parallel_divides_the_work_and_adds_all_reduce() -> None:
    m = ModelCosts.of(load_model_shape("llama-2-13b"))
    one = RooflineCost(HARDWARE["a100-80g"], m, tp=1)
    two = RooflineCost(HARDWARE["a100-80g"], m, tp=2)
    f = decode_features(8, 8000)
    assert two.step_s(f) < one.step_s(f)
    assert two.step_s(f) > (one.step_s(f) - 0.002) / 2 + 0.002  # the all-reduce costs time
    assert two.kv_capacity_tokens() > 2 * one.kv_capacity_tokens()


@pytest.mark.parametrize("b,ctx", [(1, 50), (32, 32 * 1500), (200, 200 * 3000)])
def test_decode_piece_matches_step_by_step_times(b: int, ctx: int) -> None:
    m = ModelCosts.of(load_model_shape("llama-2-13b"))
    for cost in (RooflineCost(HARDWARE["a100-80g"], m),
                 PipelineCost((RooflineCost(HARDWARE["a100-80g"], m, 1, 0, 20),
                               RooflineCost(HARDWARE["a100-80g"], m, 1, 20, 40))),
                 LinearCost({"const": 0.01, "prefill_tokens": 1e-4, "prefill_pairs": 1e-8,
                             "decodes": 1e-3, "decode_ctx": 1e-6, "decode_padded": 2e-7,
                             "sampled": 5e-4})):
        a, b_, k = cost.decode_piece(b, ctx, 500, ctx // b)
        assert 1 <= k <= 500
        for i in range(0, k, max(1, k // 7)):
            f = StepFeatures(decodes=b, decode_ctx=ctx + b * i, sampled=b,
                             decode_max_ctx=ctx // b + i)
            assert a + b_ * i == pytest.approx(cost.step_s(f), rel=1e-9)


def test_pipeline_stages_split_layers_and_hold_more_kv() -> None:
    one = build_replica_model("a100-80g", "llama-2-13b")
    two = build_replica_model("a100-80g", "llama-2-13b", stages=2)
    assert two.gpus == 2 and isinstance(two.cost, PipelineCost)
    assert two.kv_tokens is not None and one.kv_tokens is not None
    assert two.kv_tokens > 2 * one.kv_tokens  # half the weights per GPU leaves more room
    assert two.startup_s < one.startup_s  # each stage loads half the weights
    f = decode_features(4, 4000)
    assert isinstance(one.cost, RooflineCost)
    # One micro-batch through two stages: about the same time plus the transfer.
    assert two.cost.step_s(f) == pytest.approx(one.cost.step_s(f) + 0.002 + two.cost.transfer_s(4),
                                              rel=0.02)


def test_model_shape_from_config_json(tmp_path: Path) -> None:
    cfg = {"vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = load_model_shape(str(tmp_path))
    assert shape.num_hidden_layers == 4 and shape.num_key_value_heads == 2
    with pytest.raises(ValueError, match="neither one of"):
        load_model_shape(str(tmp_path / "missing.json"))


def test_bad_choices_fail_with_the_fix() -> None:
    with pytest.raises(ValueError, match="--hardware"):
        build_replica_model("tpu", "llama-2-13b")
    with pytest.raises(ValueError, match="do not fit"):
        build_replica_model("a100-80g", load_70b_like())
    with pytest.raises(ValueError, match="needs --profile"):
        build_replica_model("cpu-local", "smollm2-135m")


def load_70b_like() -> str:
    import tempfile

    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps({
        "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8}))
    return str(d)
