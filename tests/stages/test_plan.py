"""Balanced splits by measured cost, and the cluster file's stage section."""

from __future__ import annotations

import itertools

import pytest

from strata.stages.plan import LayerCosts, StagesConfig, balanced_split, stage_costs


def _brute(costs: LayerCosts, k: int) -> float:
    n = len(costs.layer_s)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        split = list(itertools.pairwise(bounds))
        best = min(best, max(stage_costs(costs, split)))
    return best


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_balanced_split_is_optimal_and_tiles_the_model(k: int) -> None:
    costs = LayerCosts((3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0), embed_s=0.5, head_s=7.0)
    split = balanced_split(costs, k)
    assert split[0][0] == 0 and split[-1][1] == 8 and len(split) == k
    assert all(a < b for a, b in split)
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(split))
    assert max(stage_costs(costs, split)) == pytest.approx(_brute(costs, k))


def test_heavy_lm_head_moves_the_cut_towards_the_tail() -> None:
    # 30 equal layers and an LM head worth 8 of them (the bundled model's shape).
    costs = LayerCosts(tuple([1.0] * 30), head_s=8.0)
    assert balanced_split(costs, 2) == [(0, 19), (19, 30)]
    assert balanced_split(LayerCosts(tuple([1.0] * 30)), 2) == [(0, 15), (15, 30)]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="num_stages"):
        balanced_split(LayerCosts((1.0, 1.0)), 3)
    with pytest.raises(ValueError):
        LayerCosts(())


def test_stages_config_explicit_and_auto() -> None:
    cfg = StagesConfig.model_validate(
        {"stages": [{"layers": "0:15"}, {"layers": "15:30", "max_replicas": 3}]}
    )
    got = cfg.resolve(30)
    assert [s.layers for s in got] == ["0:15", "15:30"] and got[1].max_replicas == 3
    auto = StagesConfig.model_validate({"auto": 2, "max_replicas": 2})
    costs = LayerCosts(tuple([1.0] * 30), head_s=8.0)
    assert [(s.layers, s.max_replicas) for s in auto.resolve(30, costs)] == [
        ("0:19", 1), ("19:30", 2)
    ]
    for bad, msg in (
        ({"stages": [{"layers": "0:15"}], "auto": 2}, "either"),
        ({}, "either"),
        ({"stages": [{"layers": "0:30"}]}, "at least two"),
        ({"stages": [{"layers": "0:15", "max_replicas": 2}, {"layers": "15:30"}]}, "head"),
        ({"stages": [{"layers": "0:15"}, {"layers": "15:30", "min_replicas": 3, "max_replicas": 2}]}, "min_replicas"),
    ):
        with pytest.raises(ValueError, match=msg):
            StagesConfig.model_validate(bad)
    with pytest.raises(ValueError, match="start where the previous one ends"):
        StagesConfig.model_validate({"stages": [{"layers": "0:10"}, {"layers": "12:30"}]}).resolve(30)
