"""Stage tiers for the platform: one process spec per stage, stages join the head."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.config import ClusterConfig, ClusterConfigError, parse_cluster_config
from strata.stages.plan import LayerCosts, StageSpec
from strata.stages.tiers import (
    cluster_stage_specs,
    resolve_stages,
    stage_process_specs,
    stage_tier_name,
    stage_tiers,
)


def test_specs_launch_the_head_and_joining_stages() -> None:
    head = {"url": "http://127.0.0.1:1"}
    stages = [StageSpec(layers="0:10"), StageSpec(layers="10:20"), StageSpec(layers="20:30", max_replicas=3)]
    specs = stage_process_specs(stages, head_url=lambda: head["url"], model="m.gguf", threads=2,
                                head_args=["--num-kv-blocks", "64"])
    assert list(specs) == ["stage-0-10", "stage-10-20", "stage-20-30"]
    h = specs["stage-0-10"].argv("127.0.0.1", 9000)
    assert h[h.index("--stages") + 1] == "0:10,10:20,20:30" and "--join" not in h
    assert h[-2:] == ["--num-kv-blocks", "64"] and h[h.index("--model") + 1] == "m.gguf"
    head["url"] = "http://127.0.0.1:9000"  # read when the replica is launched
    s = specs["stage-20-30"].argv("127.0.0.1", 9002)
    assert s[s.index("--layers") + 1] == "20:30" and s[s.index("--join") + 1] == "http://127.0.0.1:9000"
    assert s[s.index("--port") + 1] == "9002" and specs["stage-20-30"].threads == 2
    assert stage_tier_name("15:30") == "stage-15-30"
    with pytest.raises(ValueError):
        stage_process_specs(stages[:1], head_url=lambda: "")
    joined = stage_process_specs(stages, head_url=None)["stage-10-20"].argv("127.0.0.1", 1)
    assert "--join" not in joined  # whoever runs it registers it


def _cluster(tier: dict, **top: object) -> ClusterConfig:
    return parse_cluster_config({"tiers": {"pipe": tier}, **top})


def test_cluster_pipeline_tiers_and_their_commands() -> None:
    c = _cluster({"stages": [{"layers": "0:10"}, {"layers": "10:20", "replicas": 2,
                                                  "max_replicas": 3},
                             {"layers": "20:30"}]},
                 model="m.gguf", engine={"num_kv_blocks": 64, "max_model_len": 256,
                                         "prefix_caching": False})
    stages = list(c.tiers["pipe"].stages)
    tiers = stage_tiers("pipe", stages)
    assert [(t.name, t.layers, t.head, t.min_replicas, t.max_replicas, t.initial_replicas)
            for t in tiers] == [("pipe", "0:10", True, 1, 1, 1),
                                ("stage-10-20", "10:20", False, 1, 3, 2),
                                ("stage-20-30", "20:30", False, 1, 1, 1)]
    assert [t.autoscaled for t in tiers] == [False, True, False]

    async def drained(url: str) -> bool:
        return True

    specs = cluster_stage_specs(c, "pipe", stages, drained=drained, cores=10)
    assert list(specs) == ["pipe", "stage-10-20", "stage-20-30"]
    assert {s.threads for s in specs.values()} == {2}  # 10 cores over at most 5 processes
    h = specs["pipe"].argv("127.0.0.1", 9000)
    assert h[h.index("--stages") + 1] == "0:10,10:20,20:30"
    assert h[h.index("--num-kv-blocks") + 1] == "64" and "--no-prefix-caching" in h
    assert h[h.index("--dtype") + 1] == "float32"  # auto: one dtype for every stage
    s = specs["stage-20-30"].argv("127.0.0.1", 9002)
    assert "--join" not in s and "--num-kv-blocks" not in s  # the cluster registers it
    assert specs["stage-20-30"].drained is drained and specs["pipe"].drained is None


@pytest.mark.slow
def test_resolve_checks_the_split_against_the_model(bundled_gguf: Path) -> None:
    model = str(bundled_gguf)
    ok = _cluster({"stages": [{"layers": "0:15"}, {"layers": "15:30"}]}, model=model)
    assert [s.layers for s in resolve_stages(ok, "pipe")] == ["0:15", "15:30"]
    short = _cluster({"stages": [{"layers": "0:15"}, {"layers": "15:28"}]}, model=model)
    with pytest.raises(ClusterConfigError, match=r"tiers.pipe.stages: the last stage must end "
                       r"at layer 30"):
        resolve_stages(short, "pipe")
    auto = _cluster({"stages": "auto", "num_stages": 2, "stage_max_replicas": 3}, model=model)
    costs = LayerCosts(tuple([1.0] * 30), head_s=8.0)  # an LM head as heavy as 8 layers
    got = resolve_stages(auto, "pipe", measure=lambda: costs)
    assert [(s.layers, s.bounds[1]) for s in got] == [("0:19", 1), ("19:30", 3)]
    too_many = _cluster({"stages": "auto", "num_stages": 31}, model=model)
    with pytest.raises(ClusterConfigError, match="tiers.pipe.num_stages"):
        resolve_stages(too_many, "pipe")


@pytest.mark.slow
def test_auto_split_measures_this_machine(bundled_gguf: Path) -> None:
    auto = _cluster({"stages": "auto", "num_stages": 2}, model=str(bundled_gguf),
                    engine={"dtype": "float32"})
    got = resolve_stages(auto, "pipe")  # times every layer and the LM head of the real model
    a, b = got[0].range
    assert a == 0 and got[1].range == (b, 30)
    assert 15 <= b < 30  # the tail holds the LM head, so it gets fewer layers (or as many)
