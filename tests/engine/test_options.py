"""Engine options are declared once (``EngineOptions``); the CLIs and the platform follow it.

``strata engine``'s flags are generated from the model; ``strata stage`` declares its head
flags by hand (they mean other things on a downstream stage), so these tests fail when
either drifts from the model: a field without its flag, a different default, or flags the
platform writes that the command does not read back to the same options.
"""

from __future__ import annotations

from typing import Any

import click
import typer
from typer.testing import CliRunner

from strata.cli import app as strata_app
from strata.config import parse_cluster_config
from strata.engine.options import EngineConfig, EngineOptions, parse_bytes
from strata.platform.process import engine_spec
from strata.stages.head_server import HeadConfig
from strata.stages.tiers import cluster_stage_specs

# Options the pipeline head does not take: its KV cache is in the model's dtype.
# LoRA adapters run in a whole engine only (strata.engine.lora).
NOT_ON_THE_HEAD = {"kv_cache_dtype", "enable_lora", "lora_modules", "max_loras", "max_lora_rank",
                   "tool_call_parser", "enable_auto_tool_choice", "chat_template"}


def _command(name: str) -> click.Command:
    group = typer.main.get_command(strata_app)
    with click.Context(group) as ctx:
        cmd = group.get_command(ctx, name)
    assert cmd is not None
    return cmd


def _parsed(name: str, args: list[str]) -> dict[str, Any]:
    cmd = _command(name)
    with cmd.make_context(name, args) as ctx:
        return dict(ctx.params)


def _options_from(params: dict[str, Any], fields: set[str]) -> EngineOptions:
    values = {k: params[k] for k in fields if params.get(k) is not None}
    if "no_prefix_caching" in params:  # strata stage spells it as a negative flag
        values["prefix_caching"] = not params["no_prefix_caching"]
    return EngineOptions(**values)


def test_strata_engine_has_one_flag_per_field_with_its_default() -> None:
    params = {p.name: p for p in _command("engine").params}
    for name, field in EngineOptions.model_fields.items():
        assert name in params, f"strata engine lacks --{name.replace('_', '-')}"
        assert params[name].default == field.default, name
        assert params[name].help == field.description, name
    assert "--no-prefix-caching" in params["prefix_caching"].secondary_opts


def test_strata_stage_declares_every_head_option_with_the_models_default() -> None:
    params = {p.name: p for p in _command("stage").params}
    for name, field in EngineOptions.model_fields.items():
        if name in NOT_ON_THE_HEAD:
            continue
        if name == "prefix_caching":
            assert params["no_prefix_caching"].default is (not field.default)
            continue
        assert name in params, f"strata stage lacks --{name.replace('_', '-')}"
        default = params[name].default
        if name == "kv_cache":  # unset: the model's default on the head
            assert default is None
            continue
        assert default == field.default, name


def test_the_platforms_flags_read_back_as_the_cluster_files_options() -> None:
    engine = {"dtype": "float32", "kv_cache": "64MiB", "kv_cache_dtype": "float16",
              "num_kv_blocks": 40, "block_size": 32, "max_num_seqs": 8,
              "max_num_batched_tokens": 128, "max_model_len": 1024, "prefix_caching": False,
              "threads": 3, "enable_lora": True, "lora_modules": ["a=/x", "b=/y"], "max_loras": 3,
              "max_lora_rank": 8, "tool_call_parser": "hermes", "enable_auto_tool_choice": False,
              "chat_template": "hermes_tools"}
    cfg = parse_cluster_config({"engine": engine})
    argv = engine_spec(cfg, "engine").argv("127.0.0.1", 8001)
    back = _options_from(_parsed("engine", argv[4:]), set(EngineOptions.model_fields))
    assert back.model_dump(exclude={"kv_cache"}) == cfg.engine.model_dump(exclude={"kv_cache"})
    assert parse_bytes(back.kv_cache) == cfg.engine.kv_cache_bytes == 64 << 20

    head_only = {k: v for k, v in engine.items() if k not in NOT_ON_THE_HEAD}
    pipe = parse_cluster_config({"engine": head_only, "tiers": {"pipe": {"stages": [
        {"layers": "0:10"}, {"layers": "10:20"}]}}})
    stages = list(pipe.tiers["pipe"].stages)
    head = cluster_stage_specs(pipe, "pipe", stages, cores=4)["pipe"].argv("127.0.0.1", 8002)
    fields = set(EngineOptions.model_fields) - NOT_ON_THE_HEAD - {"prefix_caching"}
    back = _options_from(_parsed("stage", head[4:]), fields)
    assert back.model_dump(exclude={"kv_cache"}) == pipe.engine.model_dump(exclude={"kv_cache"})


def test_a_bad_option_fails_naming_its_flag_before_any_model_loads() -> None:
    result = CliRunner().invoke(strata_app, ["engine", "--kv-cache", "12k"])
    assert result.exit_code == 2
    assert "--kv-cache" in result.output and "below 1MiB" in result.output
    result = CliRunner().invoke(strata_app, ["engine", "--dtype", "int4"])
    assert result.exit_code == 2 and "--dtype" in result.output


def test_configs_extend_the_options_and_size_the_kv_cache_once() -> None:
    cfg = EngineConfig(model="m.gguf", kv_cache="1MiB", block_size=16)
    assert cfg.kv_blocks(4096) == 256 and cfg.model_copy(update={"num_kv_blocks": 7}).kv_blocks(1) == 7
    assert cfg.kv_blocks(1 << 30) == 1  # never zero blocks
    head = HeadConfig(stages=((0, 1), (1, 2)), internal_token="s3cret")
    assert "s3cret" not in repr(head) and head.max_num_seqs == EngineOptions().max_num_seqs
    try:
        HeadConfig(stages=((0, 1), (1, 2)), kv_cache_dtype="float16")
    except ValueError as e:
        assert "kv_cache_dtype" in str(e)
    else:
        raise AssertionError("a head with its own KV dtype must be refused")
