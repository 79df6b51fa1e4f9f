"""strata.cluster's pure parts: what the gateway is told before any replica starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.cluster import gateway_config, served_model_name
from strata.config import ClusterConfig
from strata.engine.engine import default_model_name


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct.Q4_1.gguf", "tiny-model.F16.gguf",
                                  "llama-dir"])
def test_served_model_name_follows_the_engines_rule(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".gguf"):
        path.write_bytes(b"")
    else:
        path.mkdir()
    config = ClusterConfig.model_validate({"model": {"path": str(path)}})
    assert served_model_name(config) == default_model_name(path)


def test_bundled_and_explicit_names() -> None:
    assert served_model_name(ClusterConfig()) == "SmolLM2-135M-Instruct"
    named = ClusterConfig.model_validate({"model": {"served_model_name": "chat"}})
    gw = gateway_config(named, None)
    assert [(t.name, t.served_models) for t in gw.routes()] == [("engine", ("chat",))]
    assert gw.drain_timeout_s == named.platform.drain_timeout_s


def test_the_gateway_gets_one_route_per_tier() -> None:
    config = ClusterConfig.model_validate({"tiers": {
        "chat": {}, "lazy": {"model": {"served_model_name": "b"}, "replicas": 0}}})
    gw = gateway_config(config, None)
    assert [(t.name, t.served_models) for t in gw.routes()] == [
        ("chat", ("SmolLM2-135M-Instruct",)), ("lazy", ("b",))]
    assert served_model_name(config, "lazy") == "b"
