"""Stage tiers for the platform: one process spec per stage, stages join the head."""

from __future__ import annotations

import pytest

from strata.stages.plan import StageSpec
from strata.stages.tiers import stage_process_specs, stage_tier_name


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
