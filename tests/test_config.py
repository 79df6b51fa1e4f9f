"""The cluster file: defaults, the bundled example, and errors that name the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from strata.autoscale.hpa import HpaConfig
from strata.autoscale.llm import LlmConfig
from strata.config import (
    ClusterConfig,
    ClusterConfigError,
    load_cluster_config,
    parse_cluster_config,
)
from strata.engine.options import parse_bytes

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "cluster.example.yaml"


def parse(text: str) -> ClusterConfig:
    return parse_cluster_config(yaml.safe_load(text), "c.yaml")


def error(text: str) -> str:
    with pytest.raises(ClusterConfigError) as info:
        parse(text)
    return str(info.value)


def test_no_file_is_a_one_replica_cluster_on_port_8000() -> None:
    c = load_cluster_config(None)
    assert c == ClusterConfig() == parse("") == parse("{}")
    assert c.default_tier == "engine" and c.served_models() == {"SmolLM2-135M-Instruct": "engine"}
    tier = c.tiers["engine"]
    assert (tier.kind, tier.autoscaling, tier.initial_replicas) == ("engine", None, 1)
    assert (tier.min_replicas, tier.max_replicas) == (1, 1)
    assert (c.gateway.host, c.gateway.port) == ("127.0.0.1", 8000)
    assert c.model.path is None and c.prometheus.url is None
    assert c.autoscaler.period_s == 15.0


def test_bundled_example_validates_and_matches_the_defaults_it_documents() -> None:
    c = load_cluster_config(EXAMPLE)
    default = ClusterConfig()
    for section in ("model", "engine", "routing", "autoscaler", "slos", "gateway", "platform",
                    "prometheus"):
        assert getattr(c, section) == getattr(default, section), section
    auto = c.tiers["engine"].autoscaling
    assert isinstance(auto, LlmConfig) and (auto.min_replicas, auto.max_replicas) == (1, 2)
    assert auto.behavior.scale_down is not None
    assert auto.behavior.scale_down.stabilization_window_seconds == 60


def test_autoscaling_block_is_the_autoscalers_own_model_with_bounds() -> None:
    c = parse("""
tiers:
  engine:
    replicas: 5
    autoscaling: {policy: hpa, min_replicas: 0, max_replicas: 3,
                  metrics: [{name: concurrency, source: tier, type: AverageValue, average_value: 4}]}
""")
    tier = c.tiers["engine"]
    assert isinstance(tier.autoscaling, HpaConfig)
    assert (tier.min_replicas, tier.max_replicas, tier.initial_replicas) == (0, 3, 3)
    assert c.autoscaling_for("engine") is tier.autoscaling  # hpa has no SLO fields


def test_kpa_without_max_replicas_is_bounded_by_its_starting_count() -> None:
    tier = parse("tiers: {engine: {replicas: 2, autoscaling: {policy: kpa}}}").tiers["engine"]
    assert (tier.min_replicas, tier.max_replicas, tier.initial_replicas) == (0, 2, 2)


def test_cluster_slos_fill_llm_policies_unless_the_tier_sets_its_own() -> None:
    c = parse("""
slos: {ttft_s: 1.5, tpot_s: 0.1, percentile: 95}
tiers: {engine: {autoscaling: {policy: predictive, max_replicas: 2, tpot_slo_s: 0.05}}}
""")
    cfg = c.autoscaling_for("engine")
    assert (cfg.ttft_slo_s, cfg.tpot_slo_s, cfg.slo_percentile) == (1.5, 0.05, 95.0)
    assert cfg.policy == "predictive"


def test_model_shorthand_and_engine_sizes() -> None:
    c = parse("model: /models/x.gguf\nengine: {kv_cache: 256MiB, threads: 2}")
    assert c.model.path == "/models/x.gguf"
    assert c.engine.kv_cache_bytes == 256 << 20 and c.engine.threads == 2
    assert parse_bytes("1GiB") == parse_bytes("1g") == 1 << 30
    assert parse_bytes(4096) == 4096


def test_tier_engine_section_overrides_the_cluster_one() -> None:
    c = parse("engine: {max_num_seqs: 8}\ntiers: {engine: {engine: {max_num_seqs: 4}}}")
    assert c.engine_for("engine").max_num_seqs == 4


@pytest.mark.parametrize(("text", "expected"), [
    ("tiers: {engine: {autoscaling: {policy: hpa}}}",
     "c.yaml: tiers.engine.autoscaling.max_replicas: Field required; fix: add max_replicas"),
    ("tiers: {engine: {autoscalng: {policy: hpa}}}",
     "tiers.engine.autoscalng: Extra inputs are not permitted; fix: did you mean 'autoscaling'?"),
    ("tiers: {engine: {autoscaling: {policy: llm, max_replicas: 2, targt_kv_usage: 0.5}}}",
     "tiers.engine.autoscaling.targt_kv_usage: Extra inputs are not permitted; fix: did you "
     "mean 'target_kv_usage'?"),
    ("tiers: {engine: {autoscaling: {policy: hpx, max_replicas: 2}}}",
     "fix: set policy to one of hpa, kpa, llm, predictive"),
    ("gateway: {prot: 80}", "gateway.prot: Extra inputs are not permitted; fix: did you mean 'port'?"),
    ("autoscaler: {period_s: 0.5}",
     "autoscaler.period_s: Input should be greater than or equal to 1; fix: change the value"),
    ("engine: {kv_cache: 12x}", "engine.kv_cache: '12x' is not a size; write e.g. 256MiB"),
    ("engine: {dtype: fp8}", "engine.dtype: Input should be 'auto', 'float32'"),
    ("routing: {policy: fastest}", "routing: policy 'fastest' is unknown; use one of resource_match"),
    ("routing: {policy: round_robin, params: {speed: 3}}", "bad parameters for routing policy"),
    ("tiers: {engine: {}, other: {}}", "tiers.engine and tiers.other both serve model "
     "'SmolLM2-135M-Instruct', but the gateway routes by model name; give one of them its own "
     "name, e.g. tiers.other.model.served_model_name: SmolLM2-135M-Instruct-other"),
    ("tiers: {a: {model: x.gguf}, b: {model: {path: y.gguf, served_model_name: x}}}",
     "tiers.a and tiers.b both serve model 'x'"),
    ("tiers: {}", "tiers: give at least one tier"),
    ("tiers: {a: {model: {pth: x}}}", "tiers.a.model.pth: Extra inputs are not permitted; fix: "
     "did you mean 'path'?"),
    ("tiers: {p: {stages: auto, num_stages: 2}, q: {stages: auto, num_stages: 2, "
     "model: {served_model_name: q}}}", "tiers: one stage pipeline per cluster"),
    ("tiers: {p: {stages: auto, num_stages: 2}, stage-0-1: {model: {served_model_name: s}}}",
     "tiers.stage-0-1: names stage-... are the pipeline's own stage tiers"),
    ("tiers: {Engine_1: {}}", "tiers: name 'Engine_1' must be lowercase letters"),
    ("tiers: {engine: {custom_metrics: {custom_q: 'sum(up)'}}}", "set prometheus.url"),
    ("tiers: {engine: {custom_metrics: {q: 'sum(up)'}}}", "must be named custom_<something>"),
    ("prometheus: {url: localhost:9090}", "must look like http://host:9090"),
    ("tiers: {engine: {autoscaling: {policy: llm, min_replicas: 3, max_replicas: 2}}}",
     "min_replicas (3) must be <= max_replicas (2)"),
    ("- a\n- b", "c.yaml: the top level must be a mapping of sections"),
])
def test_errors_name_the_field_and_the_fix(text: str, expected: str) -> None:
    assert expected in error(text)


def test_stage_pipeline_tier_explicit_and_auto() -> None:
    c = parse("""
tiers:
  pipeline:
    stages: [{layers: "0:15"}, {layers: "15:30", max_replicas: 3}]
    stage_scaling: {target_busy_pct: 70}
""")
    tier = c.tiers["pipeline"]
    assert tier.kind == "stages" and [s.layers for s in tier.stages] == ["0:15", "15:30"]
    assert tier.stages[1].bounds == (1, 3, 1) and tier.stage_scaling.target_busy_pct == 70
    assert (tier.min_replicas, tier.max_replicas) == (1, 1)  # the head
    auto = parse("tiers: {p: {stages: auto, num_stages: 3, stage_max_replicas: 2}}").tiers["p"]
    assert (auto.kind, auto.stages, auto.num_stages, auto.stage_max_replicas) == (
        "stages", "auto", 3, 2)
    assert parse("tiers: {engine: {kind: engine}}").tiers["engine"].stages is None


def test_the_examples_commented_pipeline_validates() -> None:
    text = EXAMPLE.read_text()
    block = text[text.index("  # pipeline:"):text.index("\nrouting:")]
    lines = [line.replace("# ", "", 1) for line in block.splitlines()]
    uncommented = "\n".join(ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))
    tier = parse("tiers:\n" + uncommented).tiers["pipeline"]
    assert [s.layers for s in tier.stages] == ["0:15", "15:30"]
    assert tier.stages[1].bounds == (1, 3, 1) and tier.stage_scaling.target_busy_pct == 80


@pytest.mark.parametrize(("stages", "expected"), [
    ('[{layers: "0:15"}, {layers: "16:30"}]',
     "tiers.p: stages[1].layers: 16:30 must start where stages[0] (0:15) ends, at layer 15"),
    ('[{layers: "2:15"}, {layers: "15:30"}]', "stages[0].layers: the first stage must start at layer 0, not 2:15"),
    ('[{layers: "0:30"}]', "stages: a pipeline needs at least two layer ranges"),
    ('[{layers: "0:15", max_replicas: 2}, {layers: "15:30"}]', "stages[0]: the head"),
    ('[{layers: "0-15"}, {layers: "15:30"}]',
     "tiers.p.stages.0.layers: layers '0-15' must look like a:b"),
    ('[{layers: "0:15"}, {layers: "15:15"}]', "the range is empty"),
    ('[{layers: "0:15"}, {layers: "15:30", min_replicas: 3, max_replicas: 2}]',
     "min_replicas 3 > max_replicas 2"),
    ('[{layers: "0:15"}, {layrs: "15:30"}]',
     "tiers.p.stages.1.layrs: Extra inputs are not permitted; fix: did you mean 'layers'?"),
    ("manual", "tiers.p.stages: Input should be 'auto'"),
    ("auto", "num_stages: `stages: auto` needs the number of stages"),
])
def test_stage_errors_name_the_field(stages: str, expected: str) -> None:
    msg = error(f"tiers: {{p: {{stages: {stages}}}}}")
    assert expected in msg, msg
    assert "Input should be a valid list" not in msg, msg  # no noise from the other form


@pytest.mark.parametrize(("extra", "expected"), [
    ("autoscaling: {policy: hpa, max_replicas: 2}", "a stage pipeline scales each later stage"),
    ("replicas: 2", "replicas: a stage pipeline runs one head"),
    ("kind: engine", "stages / num_stages belong to a stage pipeline"),
    ("num_stages: 2", "num_stages goes with `stages: auto`"),
    ("engine: {dtype: int8}", "int8 weights are engine-only"),
])
def test_stage_tier_options_that_do_not_apply(extra: str, expected: str) -> None:
    assert expected in error(f'tiers: {{p: {{stages: [{{layers: "0:15"}}, {{layers: "15:30"}}], '
                             f"{extra}}}}}")


def test_several_errors_are_reported_together() -> None:
    lines = error("gateway: {port: -1}\nplatform: {stop_timeout_s: 0}").splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("c.yaml: gateway.port:")
    assert lines[1].startswith("c.yaml: platform.stop_timeout_s:")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ClusterConfigError, match="cannot read the cluster file"):
        load_cluster_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: [unclosed")
    with pytest.raises(ClusterConfigError, match="not valid YAML"):
        load_cluster_config(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("gateway: {port: 9000}\n")
    assert load_cluster_config(ok).gateway.port == 9000


def test_several_tiers_each_with_its_own_model_and_engine() -> None:
    c = parse("""
model: {served_model_name: base}
engine: {max_num_seqs: 32}
tiers:
  chat: {}
  coder: {model: models/coder.Q4_K_M.gguf, engine: {max_num_seqs: 4}}
  tiny: {model: {path: gemma3-270m}, replicas: 0,
         autoscaling: {policy: kpa, min_replicas: 0, max_replicas: 2}}
""")
    assert c.default_tier == "chat"  # the first: requests without a model go there
    assert c.served_models() == {"base": "chat", "coder": "coder", "gemma-3-270m": "tiny"}
    assert c.model_for("chat") == c.model and c.model_for("coder").path == "models/coder.Q4_K_M.gguf"
    assert [c.engine_for(t).max_num_seqs for t in c.tiers] == [32, 4, 32]
    assert c.tiers["tiny"].min_replicas == 0 and c.tiers["chat"].autoscaling is None
    assert c.pipeline_tier is None
