"""The options of one engine replica, declared once.

``EngineOptions`` is the cluster file's ``engine`` section (``strata.config``), the flags of
``strata engine`` (generated from its fields, their descriptions the help text), and the
base of ``EngineConfig`` (the options plus which model to load) and of the pipeline head's
``HeadConfig``. The platform turns it back into flags with ``kv_and_batch_args``, so a
new option is added here and nowhere else. Kept apart from ``strata.config`` so that the
CLI can build its options without importing the autoscalers and routers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: int | str) -> int:
    """``"512MiB"``, ``"1G"``, ``"65536"`` or an int -> bytes (binary units)."""
    if isinstance(value, int):
        return value
    m = _BYTES.match(str(value))
    if m is None:
        raise ValueError(f"{value!r} is not a size; write e.g. 256MiB, 1GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class EngineOptions(BaseModel):
    """Options of each engine replica (the ``strata engine`` flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = Field(
        default="auto", description="auto (the fastest of fp32, bf16 and int8 on the model's own "
        "projections, measured at start-up, a lower-quality one only when 1.25x faster; decode "
        "of 1-3 sequences on a GGUF's own blocks), float32, bfloat16, float16, int8 (CPU: W8A8, "
        "and decode of 1-3 sequences on a GGUF's own Q4_1/Q8_0 blocks).")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto, cpu or cuda.")
    threads: int | None = Field(
        default=None, ge=1, description="Compute threads, pinned; default: as many as cores "
        "are free, followed while serving (at most the allowed CPUs, the cgroup CPU quota and "
        "OMP_NUM_THREADS; in a cluster file: the cores divided among the most replicas).")
    kv_cache: int | str = Field(default="1GiB", description="KV cache size in bytes (e.g. 1GiB).")
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto (float16 under int8 weights, else the model dtype), "
        "float32, float16, bfloat16.")
    num_kv_blocks: int | None = Field(default=None, ge=1,
                                      description="KV blocks (overrides --kv-cache).")
    block_size: int = Field(default=16, ge=1, description="Tokens per KV block.")
    max_num_seqs: int = Field(default=64, ge=1, description="Max sequences per batch.")
    max_num_batched_tokens: int = Field(default=2048, ge=1,
                                        description="Token budget per step (prefill chunk).")
    max_model_len: int | None = Field(default=None, ge=16, description="Context length cap.")
    prefix_caching: bool = Field(default=True, description="Automatic prefix caching.")
    tool_call_parser: Literal["auto", "hermes", "llama3_json"] = Field(
        default="auto", description="How tool calls are parsed from the output (tool_choice "
        "auto): hermes (<tool_call> JSON: Qwen, SmolLM), llama3_json, or auto (from the chat "
        "template).")
    enable_auto_tool_choice: bool = Field(
        default=True, description="Serve tool_choice \"auto\" (the model decides, its calls "
        "parsed with --tool-call-parser).")
    chat_template: str | None = Field(
        default=None, description="A Jinja chat template file to use instead of the model's, "
        "or a shipped one by name (hermes_tools).")
    enable_lora: bool = Field(default=False, description="Serve LoRA adapters over the base model "
                              "(requests name one as their model).")
    lora_modules: list[str] = Field(
        default=[], description="LoRA adapters to load at start: name=path of a PEFT directory "
        "(repeat the flag, or several space-separated); needs --enable-lora.")
    max_loras: int = Field(default=1, ge=1, description="LoRA adapters resident at once (slots), "
                           "so the most in one batch.")
    max_lora_rank: int = Field(default=16, ge=1, description="Largest LoRA rank an adapter may have.")

    @field_validator("kv_cache")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        if parse_bytes(v) < 1 << 20:
            raise ValueError(f"kv_cache {v!r} is below 1MiB; write e.g. 256MiB or 1GiB")
        return v

    @property
    def kv_cache_bytes(self) -> int:
        """The KV cache size in bytes."""
        return parse_bytes(self.kv_cache)

    def kv_blocks(self, bytes_per_block: int) -> int:
        """KV blocks to allocate: ``num_kv_blocks``, else as many as ``kv_cache`` holds."""
        return self.num_kv_blocks or max(1, self.kv_cache_bytes // bytes_per_block)

    def tool_args(self) -> list[str]:
        """The tool-calling flags of ``strata engine`` that differ from the defaults."""
        args = []
        if self.tool_call_parser != "auto":
            args += ["--tool-call-parser", self.tool_call_parser]
        if not self.enable_auto_tool_choice:
            args += ["--no-enable-auto-tool-choice"]
        if self.chat_template is not None:
            args += ["--chat-template", self.chat_template]
        return args

    def kv_and_batch_args(self) -> list[str]:
        """The KV and batching flags, as ``strata engine`` and a pipeline head take them."""
        args = ["--kv-cache", str(self.kv_cache_bytes), "--block-size", str(self.block_size),
                "--max-num-seqs", str(self.max_num_seqs),
                "--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.num_kv_blocks is not None:
            args += ["--num-kv-blocks", str(self.num_kv_blocks)]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if not self.prefix_caching:
            args += ["--no-prefix-caching"]
        return args

    def lora_args(self) -> list[str]:
        """The LoRA flags of ``strata engine`` (none unless ``enable_lora``)."""
        if not self.enable_lora:
            return []
        args = ["--enable-lora", "--max-loras", str(self.max_loras),
                "--max-lora-rank", str(self.max_lora_rank)]
        for spec in self.lora_modules:
            args += ["--lora-modules", spec]
        return args


class EngineConfig(EngineOptions):
    """How to build one engine replica: its options, which model, and where models are cached."""

    model: str | None = None  # a .gguf file or HF directory; None: the bundled SmolLM2-135M
    served_model_name: str | None = None
    cache_dir: Path | None = None  # None: strata.engine.cache_dir.default_cache_dir()


def option_errors(err: ValidationError) -> str:
    """One line per invalid option, named as its flag: ``--kv-cache: ...``."""
    return "; ".join(
        f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: "
        f"{e['msg'].removeprefix('Value error, ')}" for e in err.errors(include_url=False))
